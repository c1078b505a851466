"""What a checkpoint holds and how its models are built.

The model and config classes of each (model type, component), the `LoadedCheckpoint` record every reader
returns, config (de)serialisation, and `build_models`, which loads weights strictly and, when they do not fit
the config, names the file, the component and the first key that differs.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.errors import ConfigError, MissingWeightsError

COMPONENTS = ("encoder", "renderer", "generator", "discriminator")
FORMATS = ("eg3d-pkl", "eg3d-pth", "3dpe", "live3d-lt", "live3d-normal", "threedpe")
MODEL_TYPES = ("3dpe", "live3d", "eg3d")
WHERE_TO_GET = "see docs/checkpoints.md (3dpe.pt / Live3D: Google Drive links in the original READMEs; EG3D: NVIDIA NGC)"

# (model type, component) → (config module, config class, model module, model class); '*' = any model type
_CLASSES: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("3dpe", "encoder"): ("models.editing.editing_encoder", "EditingEncoderConfig",
                          "models.editing.editing_encoder", "EditingEncoder"),
    ("live3d", "encoder"): ("models.live3d.encoder", "Live3DConfig", "models.live3d.encoder", "Live3DEncoder"),
    ("*", "renderer"): ("models.eg3d.config", "RendererConfig", "models.eg3d.triplane_renderer", "TriplaneRenderer"),
    ("*", "generator"): ("models.eg3d.config", "GeneratorConfig", "models.eg3d.generator", "TriPlaneGenerator"),
    ("3dpe", "discriminator"): ("models.discriminator", "DiscriminatorConfig",
                                "models.discriminator", "EditingDualDiscriminator"),
    ("*", "discriminator"): ("models.discriminator", "DiscriminatorConfig", "models.discriminator", "DualDiscriminator"),
}


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` returns.

    format: one of FORMATS; model_type: '3dpe' | 'live3d' | 'eg3d';
    components: 'encoder' / 'renderer' / 'generator' / 'discriminator' → CPU state dict (original key names);
    configs: component → architecture config dataclass (DiscriminatorConfig etc.);
    meta: provenance — 'source_path', 'source_format', 'step', 'opts', 'neural_rendering_resolution',
          'rendering_kwargs', 'eg3d' (original init args/kwargs), and 'config_matched' per component:
          True when the config came from the caller or the file records it (config.json, EG3D init kwargs),
          None when it is the original's default architecture, assumed (`build_models` checks the fit).
    """

    format: str
    model_type: str
    components: dict[str, Any]
    configs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def check_exists(path: Path) -> None:
    """MissingWeightsError (naming `path` and where to get the weights) when `path` does not exist."""
    if not path.exists():
        raise MissingWeightsError(str(path), "checkpoint", WHERE_TO_GET)


def _classes(model_type: str, component: str) -> tuple[str, str, str, str]:
    key = (model_type, component) if (model_type, component) in _CLASSES else ("*", component)
    if key not in _CLASSES:
        raise ConfigError(f"no model class for component '{component}' of a '{model_type}' model")
    return _CLASSES[key]


def _import(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def config_class(model_type: str, component: str) -> type:
    """The config dataclass of `component` in a `model_type` model."""
    mod, cls, _, _ = _classes(model_type, component)
    return _import(mod, cls)


def model_class(model_type: str, component: str) -> type:
    """The nn.Module class of `component` in a `model_type` model."""
    _, _, mod, cls = _classes(model_type, component)
    return _import(mod, cls)


def config_to_dict(cfg: Any) -> dict:
    """A component config (dataclass or mapping) → a plain JSON-safe dict."""
    from utils.config import to_dict

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return to_dict(cfg)
    if isinstance(cfg, Mapping):
        return json.loads(json.dumps(dict(cfg), default=str))
    raise ConfigError(f"a component config must be a dataclass or a dict, got {type(cfg).__name__}")


def as_config(model_type: str, component: str, cfg: Any) -> Any:
    """`cfg` (the config dataclass, or a dict of its fields) as the config dataclass of `component`."""
    cls = config_class(model_type, component)
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, Mapping):
        from utils.config import from_dict

        return from_dict(cls, dict(cfg), where=f"{component} config")
    raise ConfigError(f"{component} config must be a {cls.__name__} or a dict, got {type(cfg).__name__}")


def state_dict_differences(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """How the weights `found` differ from a model's state dict `expected`, one phrase per key.

    Shape mismatches come first, then keys the model lacks, then keys the weights lack; [] when they fit.
    """
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    mismatched, extra = [], []
    for k, v in found.items():
        if k not in shapes:
            extra.append(f"'{k}' {tuple(v.shape)} is not in the model")
        elif tuple(v.shape) != shapes[k]:
            mismatched.append(f"'{k}' is {tuple(v.shape)} in the file but {shapes[k]} in the model")
    missing = [f"'{k}' {s} is missing from the file" for k, s in shapes.items() if k not in found]
    return mismatched + extra + missing


def build_models(ckpt: LoadedCheckpoint, components: tuple[str, ...] | None = None,
                 device: str | torch.device | None = None) -> dict[str, nn.Module]:
    """Construct each component's model from its config and load its weights strictly (eval mode).

    Models are built on the CPU unless `device` is given; `device='meta'` checks that the weights fit
    (keys and shapes) without allocating anything. Raises ConfigError naming the file, the component and
    the first differing key when the weights do not fit the config (pass `configs=` to `load_checkpoint`,
    or `--config` to the converter).
    """
    where = ckpt.meta.get("source_path", "checkpoint")
    models: dict[str, nn.Module] = {}
    for comp, sd in ckpt.components.items():
        if components is not None and comp not in components:
            continue
        if comp not in ckpt.configs:
            raise ConfigError(f"'{where}': no config for component '{comp}'")
        cls = model_class(ckpt.model_type, comp)
        with torch.device(device if device is not None else "cpu"):
            model = cls(ckpt.configs[comp])
        what = f"'{where}': the '{comp}' weights do not fit {cls.__name__}({type(ckpt.configs[comp]).__name__})"
        diffs = state_dict_differences(model.state_dict(), sd)
        if diffs:
            more = f" ({len(diffs)} keys differ)" if len(diffs) > 1 else ""
            raise ConfigError(f"{what}: {diffs[0]}{more}. If the model was trained with a non-default architecture, "
                              "pass its config (load_checkpoint(configs=...), or --config ARCH.json to the converter)")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
                model.load_state_dict(sd, strict=True)
        except RuntimeError as e:  # keys and shapes fit; e.g. a tensor that cannot be copied
            raise ConfigError(f"{what}: {' '.join(str(e).split())[:800]}") from e
        if comp == "generator":
            nrr = ckpt.meta.get("neural_rendering_resolution")
            if nrr is not None and hasattr(model, "neural_rendering_resolution"):
                model.neural_rendering_resolution = int(nrr)
        models[comp] = model.eval()
    return models
