"""The entry points that take a path or a Hugging Face Hub id: resolve it, detect the format, read it.

Hub ids are resolved here and only here (`hub.resolve_weights`); everything below works on local paths.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.checkpoint.detect import (
    detect_local_format,
    format_of,
    project_dir_or_error,
    sniff,
)
from models.checkpoint.original import read_file, read_original
from models.checkpoint.project import load_pretrained
from models.checkpoint.registry import (
    LoadedCheckpoint,
    as_config,
    build_models,
    check_exists,
)
from models.checkpoint.hub import resolve_weights
from utils.errors import ConfigError


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of `path` (a path or a Hub id) from its content (see FORMATS). Cheap: tensors are
    not read.

    Raises MissingWeightsError for a missing path, UnknownCheckpointFormatError (saying what was found)
    for anything else, UnsafePickleError for a pickle that asks for a global outside the allow-list.
    """
    path = resolve_weights(path)  # a local path, or a Hub id → its cached copy
    check_exists(path)
    return detect_local_format(path)


def load_checkpoint(path: str | os.PathLike, configs: Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint to CPU state dicts + architecture configs (no model is built).

    `path`: a file, a project folder, or a Hugging Face Hub id `org/name[@rev][/file]` (models/checkpoint/hub.py).
    `configs` (component → config dataclass or dict) sets the architecture of components whose file records
    none (the original's 3dpe.pt, Live3D: by default the original's full-size one) and overrides recorded ones
    (the project format, a 3dpe.pt this project wrote, EG3D files). Optimizer states in training checkpoints
    are ignored. A file cut short or damaged raises CorruptCheckpointError naming it.
    """
    path = resolve_weights(path)  # a local path, or a Hub id → its cached copy
    check_exists(path)
    kind = sniff(path)
    if kind in ("dir", "safetensors"):
        ckpt = load_pretrained(project_dir_or_error(path))
        for comp, cfg in (configs or {}).items():
            if comp in ckpt.components:
                ckpt.configs[comp] = as_config(ckpt.model_type, comp, cfg)
        return ckpt
    obj = read_file(path, kind)
    fmt = format_of(obj, str(path))
    ckpt = read_original(obj, fmt, configs, where=str(path))
    ckpt.meta["source_path"] = str(path)
    ckpt.meta["source_format"] = fmt
    return ckpt


def load_eg3d_generator(network: str | os.PathLike, device: torch.device | None = None) -> nn.Module:
    """The one EG3D generator loader: a `TriPlaneGenerator` from an NVIDIA .pkl, a converted .pth or a project
    checkpoint holding one, in eval mode without gradients, on `device` (default CPU)."""
    ckpt = load_checkpoint(network)
    if "generator" not in ckpt.components:
        raise ConfigError(f"'{network}' is a {ckpt.format} checkpoint without an EG3D generator; pass the EG3D .pkl, "
                          "the converted .pth, or a project checkpoint converted from one")
    gen = build_models(ckpt, components=("generator",))["generator"]
    return gen.to(device or torch.device("cpu")).eval().requires_grad_(False)
