"""Switches for tests and benchmarks only, read from one environment variable, `THREEDPE_TEST_HOOKS` (JSON).

    THREEDPE_TEST_HOOKS='{"stop_after": 2}' python train_scripts.py train --config configs/train_tiny.yaml ...
    with testing_hooks.enabled(stop_after=2):      # in a test: set for the block, then restored
        main(cfg)

They are not part of any user config: they simulate a kill (a clean stop, or a real SIGKILL of one rank that
torchrun's `--max-restarts` then restarts), or build full-size networks from random weights so that a
benchmark needs no weight files. Tiny smoke runs (`model.tiny=true`, `configs/train_tiny.yaml`) need
none of them. Child processes (torchrun ranks, DataLoader workers) inherit the variable.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from utils.config import from_dict
from utils.distributed import restart_count
from utils.errors import ConfigError

ENV = "THREEDPE_TEST_HOOKS"


@dataclass(frozen=True)
class Hooks:
    """stop_after: training stops after this step as if killed (0 = off).
    random_init: training builds the full-size networks without `model.init_checkpoint` (random weights).
    random_loss_nets: training's LPIPS (AlexNet) and ID (IR-SE50) nets start random instead of loading files.
    kill_rank_at_step: [rank, step]: training SIGKILLs that rank once the step (and its checkpoint) is done.
    kill_while_saving: training SIGKILLs rank 0 while it writes this step's checkpoint (every file written,
        the folder not yet renamed into place).
    kill_rank_after_units: [rank, n]: datagen SIGKILLs that rank once it has finished n units in this launch.
    The kills happen only on a first launch, not after a torchrun restart, so the restarted group runs through.
    """

    stop_after: int = 0
    random_init: bool = False
    random_loss_nets: bool = False
    kill_rank_at_step: tuple[int, ...] = ()
    kill_while_saving: int = 0
    kill_rank_after_units: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("kill_rank_at_step", "kill_rank_after_units"):
            if getattr(self, name) and len(getattr(self, name)) != 2:
                raise ConfigError(f"{ENV}: {name} must be [rank, count], e.g. {ENV}='{{\"{name}\": [1, 3]}}'")


def hooks() -> Hooks:
    """The hooks set in `THREEDPE_TEST_HOOKS` (all off when it is unset); ConfigError for bad JSON or keys."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return Hooks()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{ENV} is not valid JSON ({e.msg}); e.g. {ENV}='{{\"stop_after\": 2}}'") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{ENV} must be a JSON object, e.g. {ENV}='{{\"stop_after\": 2}}'")
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


def kill_now() -> None:
    """SIGKILL this process on a first launch (no cleanup, no exit handlers, as the OOM killer or a lost node
    would); after a torchrun restart (`TORCHELASTIC_RESTART_COUNT` > 0) do nothing."""
    if restart_count() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_at(target: Sequence[int], rank: int, count: int) -> None:
    """`kill_now` when `target` (a [rank, count] hook, () = off) is this rank at this count."""
    if target and (int(target[0]), int(target[1])) == (rank, count):
        kill_now()
