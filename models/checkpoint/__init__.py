"""Every checkpoint format in, the project format out (and the original layouts back out).

Formats (detected from the CONTENT, never from the file name):

| format          | what                                                                  | components                     |
|-----------------|-----------------------------------------------------------------------|--------------------------------|
| `eg3d-pkl`      | NVIDIA EG3D network pickle (`G_ema`, `D`, ...), read as data          | generator (+ discriminator)    |
| `eg3d-pth`      | the converted `ffhqrebalanced512-128.pth` (`G_init_kwargs`, `G`, ...)  | generator (+ discriminator)    |
| `3dpe`          | the original `3dpe.pt` (`encoder_state_dict` with `Ref_encoder.*`)    | encoder, renderer, discriminator |
| `live3d-lt`     | Live3D `encoder_render_LT*.pt`                                        | encoder, renderer, discriminator |
| `live3d-normal` | Live3D `encoder_render_Normal*.pt`                                    | encoder, renderer, discriminator |
| `threedpe`      | the project format: a directory with `config.json` + `model.safetensors` | any                          |

    ckpt = load_checkpoint("pretrained_models/3dpe.pt")      # LoadedCheckpoint
    models = build_models(ckpt)                               # {'encoder': EditingEncoder, 'renderer': ...}
    save_pretrained("pretrained_models/3dpe", ckpt.components, ckpt.model_type,
                    config_dicts(ckpt), source_info(ckpt))

Model types: `3dpe` (editing encoder + renderer), `live3d` (reconstruction encoder + renderer), `eg3d`
(generator). Architecture configs are the dataclasses of each model. The original release's training
checkpoints (3dpe.pt, Live3D) store none: they get the original's (full size), or the caller's (`configs=`);
the project format, EG3D files and every 3dpe.pt this project writes (extra key `threedpe_config`) record
theirs. `build_models` says which key does not fit when weights and config disagree. A file cut short or
damaged raises `CorruptCheckpointError` naming it (`integrity`).

One job per module:

| module        | job                                                                                     |
|---------------|-----------------------------------------------------------------------------------------|
| `load`        | the entry points taking a path or a Hub id: `load_checkpoint`, `detect_format`, `load_eg3d_generator` |
| `detect`      | the format of a local file or folder from its bytes and keys                            |
| `original`    | readers of 3dpe.pt / Live3D / EG3D .pkl / .pth, and the original architectures           |
| `project`     | the project format: `save_pretrained`, `load_pretrained`, config.json sections          |
| `export`      | writers of the original layouts: `export_original_3dpe`, `write_eg3d_pth`, ...          |
| `registry`    | model/config classes per model type and component, `LoadedCheckpoint`, `build_models`   |
| `integrity`   | a file that cannot be decoded → one `CorruptCheckpointError` naming it and the fix        |
| `safe_unpickle` | the restricted unpickler: NVIDIA pickles and EasyDict `.pth` files read as data, never code |
| `hub`         | Hugging Face Hub ids → local paths through the HF cache (`resolve_weights`)              |
| `model_card`  | the `README.md` model card of every checkpoint folder the project writes                 |
| `files`       | the names everyone shares: `CONFIG_FILE`, `WEIGHTS_FILE`, `DEFAULT_CHECKPOINT`          |

The package's own names (`__all__`) are imported from their module on first use, so `files` and `hub` stay
cheap to import (no torch) for the argument checks every tool makes before it loads a model.
"""
from __future__ import annotations

import importlib
from typing import Any

#: module → the public names this package re-exports from it
_EXPORTS: dict[str, tuple[str, ...]] = {
    "export": ("default_eg3d_d_kwargs", "eg3d_kwargs_from_config", "export_3dpe_pt", "export_eg3d_pth",
               "export_original_3dpe", "write_eg3d_pth"),
    "files": ("CONFIG_FILE", "DEFAULT_CHECKPOINT", "WEIGHTS_FILE"),
    "load": ("detect_format", "load_checkpoint", "load_eg3d_generator"),
    "original": ("ARCHITECTURE_KEY",),
    "project": ("FORMAT_VERSION", "config_dicts", "load_pretrained", "save_pretrained", "source_info"),
    "registry": ("COMPONENTS", "FORMATS", "MODEL_TYPES", "WHERE_TO_GET", "LoadedCheckpoint", "build_models",
                 "config_class", "model_class"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """`name` from the module that defines it, imported on first use (PEP 562); kept for later lookups."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
