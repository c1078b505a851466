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
"""
from __future__ import annotations

from models.checkpoint.export import (
    default_eg3d_d_kwargs,
    eg3d_kwargs_from_config,
    export_3dpe_pt,
    export_eg3d_pth,
    export_original_3dpe,
    write_eg3d_pth,
)
from models.checkpoint.load import detect_format, load_checkpoint, load_eg3d_generator
from models.checkpoint.original import ARCHITECTURE_KEY
from models.checkpoint.project import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    config_dicts,
    load_pretrained,
    save_pretrained,
    source_info,
)
from models.checkpoint.registry import (
    COMPONENTS,
    FORMATS,
    MODEL_TYPES,
    WHERE_TO_GET,
    LoadedCheckpoint,
    build_models,
    config_class,
    model_class,
)

__all__ = [
    "ARCHITECTURE_KEY", "COMPONENTS", "CONFIG_FILE", "FORMATS", "FORMAT_VERSION", "MODEL_TYPES", "WEIGHTS_FILE",
    "WHERE_TO_GET",
    "LoadedCheckpoint", "build_models", "config_class", "config_dicts", "default_eg3d_d_kwargs", "detect_format",
    "eg3d_kwargs_from_config", "export_3dpe_pt", "export_eg3d_pth", "export_original_3dpe", "load_checkpoint",
    "load_eg3d_generator", "load_pretrained", "model_class", "save_pretrained", "source_info", "write_eg3d_pth",
]
