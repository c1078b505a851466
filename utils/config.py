"""Typed configs: dataclasses are the schema and the defaults, YAML files change some keys, `key.sub=value`
overrides win.

    cfg = load_config(TrainConfig, "configs/train.yaml", ["optim.lr=2e-4", "name=run1"])
    save_config(cfg, run_dir / "config.yaml")     # the whole resolved config; config_yaml(cfg) is its text

Fields typed `Literal[...]` take only the listed values: a YAML value or override outside them is a ConfigError
naming the key and the choices when the config loads (`check_choices` does the same for a config built in
code). A dataclass may list removed keys in a `RETIRED_KEYS` class attribute (key → what replaced it): a
config file that still holds one loads without it (configs saved by older runs); an override naming one is
an error that says what replaced it.
"""
from __future__ import annotations

import copy
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


def choices(tp: Any) -> tuple:
    """The values a `Literal[...]` (or `Literal[...] | None`) type admits; () for any other type."""
    tp = _strip_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


def _check_choice(tp: Any, value: Any, where: str) -> Any:
    allowed = choices(tp)
    if any(value == a and type(value) is type(a) for a in allowed):  # True == 1, yet true is no choice of 1
        return value
    listed = ", ".join(repr(a) for a in allowed)
    hint = ""
    if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
        hint = " (YAML reads yes/no/on/off as true/false: quote the word)"
    raise ConfigError(f"{where}: {value!r} is not one of {listed}{hint}")


def check_choices(cfg: Any, where: str | None = None) -> None:
    """ConfigError when a `Literal` field of dataclass `cfg` (not its nested ones) holds a value outside its choices.

    For `__post_init__` of configs that code builds directly; `load_config`/`from_dict` check while loading.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if choices(hints[f.name]):
            value = getattr(cfg, f.name)
            if value is not None or not _is_optional(hints[f.name]):
                _check_choice(hints[f.name], value, f"{where or type(cfg).__name__}.{f.name}")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field type `tp` (dataclasses recursively; `Literal` values checked)."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    if choices(tp):
        return _check_choice(tp, value, where)
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


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys are an error naming the key.

    `where` is the key path of `data` ('' at the top; errors name e.g. 'optim.schedule').
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    at = f"{where}: " if where else ""
    kwargs = {}
    for key, value in data.items():
        if key in _retired(cls):
            raise ConfigError(f"{at}'{key}' is no longer a setting: {_retired(cls)[key]}")
        if key not in fields:
            raise ConfigError(f"{at}unknown key '{key}' (valid: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
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
    """Defaults of `cls` ← YAML file at `path` ← `overrides`; unknown keys raise ConfigError.

    The error names where the bad key or value came from: the file ('<path>: ...') or the command-line
    override that brought it ("command-line override 'foo.bar=1': ...").
    """
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
        _drop_retired(cls, loaded)
        _deep_update(data, loaded)
    from_file = copy.deepcopy(data)
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        source, error = _blame(cls, path, from_file, overrides, e)
        raise ConfigError(f"{source}: {error}") from e


def _blame(cls: type, path: str | Path | None, from_file: dict, overrides: Sequence[str],
           error: ConfigError) -> tuple[str, ConfigError]:
    """(where the error comes from, its message): the file (defaults + file fail alone), else the first
    override that fails alone on top of the file, else the overrides together."""
    try:
        from_dict(cls, copy.deepcopy(from_file))
    except ConfigError as e:
        return (str(path) if path is not None else cls.__name__), e
    for item in overrides:
        try:
            from_dict(cls, apply_overrides(copy.deepcopy(from_file), [item]))
        except ConfigError as e:
            return f"command-line override '{item}'", e
    return "the command-line overrides together", error


def config_yaml(cfg: Any) -> str:
    """The resolved config `cfg` (a dataclass) as YAML, every field in schema order; `load_config` reads it back
    to an equal config. What `save_config` writes and `--print-config` prints."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from utils.atomic import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))


def _retired(cls: type) -> dict[str, str]:
    return dict(getattr(cls, "RETIRED_KEYS", None) or {})


def _drop_retired(cls: type, data: dict) -> None:
    """Remove `cls`'s retired keys from the file mapping `data` (nested sections too), in place."""
    for key in _retired(cls):
        data.pop(key, None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(data.get(f.name), dict):
            _drop_retired(tp, data[f.name])


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
