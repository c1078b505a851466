"""Typed configs: dataclasses are the schema, YAML files fill them, `key.sub=value` overrides win.

    cfg = load_config(TrainConfig, "configs/train.yaml", ["optim.lr=2e-4", "name=run1"])
    save_config(cfg, run_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from utils.errors import ConfigError

T = TypeVar("T")


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field type `tp` (dataclasses recursively)."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_coerce(inner, v, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from e
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys are an error naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}' (valid: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Dataclass → plain nested dict (JSON/YAML-safe)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML (quote it, e.g. {key}='\"...\"')") from e
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls` ← YAML file at `path` ← `overrides`; unknown keys raise ConfigError."""
    data: dict = to_dict(cls())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"config file '{p}' is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping")
        _deep_update(data, loaded)
    apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path or cls.__name__))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from utils.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def parse_seeds(spec: str | int | Sequence[int], what: str = "seeds") -> list[int]:
    """The project's one seed-list parser: '0-3,10,2' → [0, 1, 2, 3, 10]; an int or a list of ints as is.

    Ranges are inclusive; order is kept and repeats dropped. A reversed range ('5-3'), a negative seed,
    text that is no seed, or an empty list raise ConfigError naming `what` (the option or config key).
    """
    if isinstance(spec, int):
        parts: list[str] = [str(spec)]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = [str(s) for s in spec]
    seeds: list[int] = []
    for part in parts:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if m is None:
            raise ConfigError(f"{what}: '{part}' is not a seed or a range (non-negative integers, e.g. '0-999' or "
                              "'0-9,20')")
        if m.group(3) is not None:
            seeds.append(int(m.group(3)))
            continue
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ConfigError(f"{what}: the range '{part}' runs backwards; write it low-high ('{hi}-{lo}')")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ConfigError(f"{what}: no seeds in {spec!r} (e.g. '0-999' or '0-9,20')")
    return list(dict.fromkeys(seeds))
