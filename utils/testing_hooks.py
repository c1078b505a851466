"""Switches for benchmarks and tests only, read from one environment variable, `THREEDPE_TEST_HOOKS` (JSON).

    with testing_hooks.enabled(random_init=True):      # in a benchmark: set for the block, then restored
        main(cfg)                                       # child processes get it as THREEDPE_TEST_HOOKS='{...}'

They are not part of any user config: they build full-size networks from random weights so that a benchmark
needs no weight files. They act while networks are built, never inside the training or datagen loop (tests
break runs from outside: a signal, a killed process). Tiny smoke runs (`model.tiny=true`,
`configs/train_tiny.yaml`) need none of them. Child processes (torchrun ranks, DataLoader workers) inherit
the variable.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from utils.config import from_dict
from utils.errors import ConfigError

ENV = "THREEDPE_TEST_HOOKS"


@dataclass(frozen=True)
class Hooks:
    """random_init: training builds the full-size networks without `model.init_checkpoint` (random weights).
    random_loss_nets: training's LPIPS (AlexNet) and ID (IR-SE50) nets start random instead of loading files.
    """

    random_init: bool = False
    random_loss_nets: bool = False


def hooks() -> Hooks:
    """The hooks set in `THREEDPE_TEST_HOOKS` (all off when it is unset); ConfigError for bad JSON or keys."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return Hooks()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{ENV} is not valid JSON ({e.msg}); e.g. {ENV}='{{\"random_init\": true}}'") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{ENV} must be a JSON object, e.g. {ENV}='{{\"random_init\": true}}'")
    return from_dict(Hooks, data, where=ENV)


def env(**values: Any) -> dict[str, str]:
    """`{THREEDPE_TEST_HOOKS: json}` for a child process's environment (keys: the fields of `Hooks`)."""
    from_dict(Hooks, values, where=ENV)  # a misspelt hook fails here, in the test, not in the child
    return {ENV: json.dumps(values)}


@contextlib.contextmanager
def enabled(**values: Any) -> Iterator[Hooks]:
    """Set the hooks `values` (the others off) for the block; the previous value comes back afterwards."""
    previous = os.environ.get(ENV)
    os.environ.update(env(**values))
    try:
        yield hooks()
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
