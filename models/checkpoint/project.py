"""The project format: a directory with `config.json` (architecture + provenance) and `model.safetensors`.

    save_pretrained("pretrained_models/3dpe", ckpt.components, ckpt.model_type, config_dicts(ckpt), source_info(ckpt))
    load_pretrained("pretrained_models/3dpe")                  # → LoadedCheckpoint (format 'threedpe')
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.checkpoint.files import CONFIG_FILE, WEIGHTS_FILE
from models.checkpoint.integrity import corrupt_error, reading
from models.checkpoint.registry import (
    COMPONENTS,
    MODEL_TYPES,
    WHERE_TO_GET,
    LoadedCheckpoint,
    as_config,
    check_exists,
    config_to_dict,
)
from utils.atomic import atomic_directory
from utils.errors import ConfigError, MissingWeightsError, UnknownCheckpointFormatError

FORMAT_VERSION = 1


def json_safe(obj: Any) -> Any:
    """`obj` as plain JSON values (arrays/tensors → lists, anything else unknown → str)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def project_dir(path: Path) -> Path | None:
    """The project-format directory `path` names (the folder, or its model.safetensors), else None."""
    if path.is_dir():
        return path if (path / CONFIG_FILE).is_file() else None
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    return None


def read_project_config(path: Path) -> dict:
    """`path/config.json`, checked to be a project checkpoint config this code can read."""
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt_error(path / CONFIG_FILE, f"not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "threedpe":
        found = cfg.get("format") if isinstance(cfg, dict) else None
        raise UnknownCheckpointFormatError(
            f"'{path / CONFIG_FILE}' is not a project checkpoint config (format={found!r}, expected 'threedpe')"
        )
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise UnknownCheckpointFormatError(
            f"'{path}' has format_version {cfg.get('format_version')}, newer than this code ({FORMAT_VERSION}); update the code"
        )
    return cfg


def config_header(model_type: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json without its `source`: format, version, model type and each component's config as plain types.
    Also the architecture a 3dpe.pt written by this project records (`original.ARCHITECTURE_KEY`)."""
    return {"format": "threedpe", "format_version": FORMAT_VERSION, "model_type": model_type,
            "config": {comp: config_to_dict(c) for comp, c in config.items()}}


def save_pretrained(
    dst_dir: str | os.PathLike,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    model_type: str,
    config: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write the project format: `dst_dir/config.json` + `dst_dir/model.safetensors`, atomically.

    components: component → state dict (original key names; stored as '<component>.<key>');
    config: component → config dataclass or dict; source: provenance (JSON-serialisable; converted).
    The directory is written under a temporary name next to `dst_dir` and renamed into place.
    """
    from safetensors.torch import save_file

    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    dst = Path(dst_dir)
    tensors: dict[str, torch.Tensor] = {}
    order: dict[str, list[str]] = {}
    seen_ptrs: set[int] = set()
    for comp, sd in components.items():
        if comp not in COMPONENTS:
            raise ConfigError(f"unknown component '{comp}' (valid: {', '.join(COMPONENTS)})")
        order[comp] = list(sd.keys())
        for k, v in sd.items():
            t = v.detach().to("cpu").contiguous()
            if t.numel() > 0 and t.untyped_storage().data_ptr() in seen_ptrs:
                t = t.clone()  # safetensors refuses shared storage
            if t.numel() > 0:
                seen_ptrs.add(t.untyped_storage().data_ptr())
            tensors[f"{comp}.{k}"] = t
    cfg_json = {**config_header(model_type, {comp: c for comp, c in config.items() if comp in components}),
                "source": json_safe(dict(source or {}))}
    with atomic_directory(dst) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "key_order": json.dumps(order)})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg_json, indent=2) + "\n")
    return dst


def load_pretrained(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a project-format directory back (state dicts in their original key order, configs as dataclasses).

    A config.json or model.safetensors cut short or damaged raises CorruptCheckpointError naming the file.
    """
    from safetensors import safe_open

    path = Path(path)
    check_exists(path)
    cfg = read_project_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingWeightsError(str(weights), "project checkpoint weights", WHERE_TO_GET)
    model_type = cfg.get("model_type")
    components: dict[str, Any] = {}
    with reading(weights), safe_open(str(weights), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        order = json.loads(meta["key_order"]) if "key_order" in meta else {}
        by_comp: dict[str, list[str]] = collections.defaultdict(list)
        for full in f.keys():
            comp, _, k = full.partition(".")
            by_comp[comp].append(k)
        comps = [c for c in order if c in by_comp] + [c for c in by_comp if c not in order]
        for comp in comps:
            ks = by_comp[comp]
            if comp not in COMPONENTS:
                raise UnknownCheckpointFormatError(f"'{weights}' has tensors under unknown component '{comp}'")
            wanted = order.get(comp, ks)
            if set(wanted) != set(ks):
                wanted = ks
            components[comp] = collections.OrderedDict((k, f.get_tensor(f"{comp}.{k}")) for k in wanted)
    configs = {comp: as_config(model_type, comp, c) for comp, c in (cfg.get("config") or {}).items() if comp in components}
    meta_out = dict(cfg.get("source") or {})
    meta_out.update(source_path=str(path), source_format="threedpe", config_matched={c: True for c in configs})
    return LoadedCheckpoint("threedpe", model_type, components, configs, meta_out)


def config_dicts(ckpt: LoadedCheckpoint) -> dict[str, dict]:
    """The `config` section of config.json for `ckpt` (component → plain dict)."""
    return {comp: config_to_dict(cfg) for comp, cfg in ckpt.configs.items()}


def source_info(ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """Provenance for config.json's `source`: original path/format, step, opts, EG3D kwargs, rendering."""
    keep = ("source_path", "source_format", "step", "best_val_loss", "opts", "neural_rendering_resolution",
            "rendering_kwargs", "eg3d", "training_set_kwargs")
    out = {k: ckpt.meta[k] for k in keep if k in ckpt.meta}
    if "source_path" in out:
        out["path"] = out.pop("source_path")
    if "source_format" in out:
        out["format"] = out.pop("source_format")
    return json_safe(out)
