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
(generator). Architecture configs are the dataclasses of each model; for original formats (which store no
architecture) they are the defaults, or — for small test models — the candidate (`tiny()`) whose state-dict
shapes match the weights exactly; `configs=` overrides both.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from models.hub import resolve_weights
from utils.atomic import atomic_directory, atomic_torch_save
from utils.errors import ConfigError, MissingWeightsError, UnknownCheckpointFormatError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
COMPONENTS = ("encoder", "renderer", "generator", "discriminator")
FORMATS = ("eg3d-pkl", "eg3d-pth", "3dpe", "live3d-lt", "live3d-normal", "threedpe")
MODEL_TYPES = ("3dpe", "live3d", "eg3d")
WHERE_TO_GET = "see docs/checkpoints.md (3dpe.pt / Live3D: Google Drive links in the original READMEs; EG3D: NVIDIA NGC)"

_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."

# component → (config module, config class, model module, model class) per model type
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
          'rendering_kwargs', 'eg3d' (original init args/kwargs), 'config_matched' per component.
    """

    format: str
    model_type: str
    components: dict[str, Any]
    configs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------------
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


def _to_dict(cfg: Any) -> dict:
    from utils.config import to_dict

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return to_dict(cfg)
    if isinstance(cfg, Mapping):
        return json.loads(json.dumps(dict(cfg), default=str))
    raise ConfigError(f"a component config must be a dataclass or a dict, got {type(cfg).__name__}")


def _as_config(model_type: str, component: str, cfg: Any) -> Any:
    cls = config_class(model_type, component)
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, Mapping):
        from utils.config import from_dict

        return from_dict(cls, dict(cfg), where=f"{component} config")
    raise ConfigError(f"{component} config must be a {cls.__name__} or a dict, got {type(cfg).__name__}")


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _pick_config(model_type: str, component: str, sd: Mapping[str, torch.Tensor], primary: Any,
                 alternates: list[Any]) -> tuple[Any, bool | None]:
    """Config for weights `sd`: the first small alternate (`tiny()`) whose model has exactly these keys and
    shapes (checked by building it: cheap), else `primary` (the original's architecture; not built here —
    `build_models` loads strictly and says so if it does not fit). Returns (config, verified-or-None).
    """
    want = _shapes(sd)
    cls = model_class(model_type, component)
    for cfg in alternates:
        try:
            got = _shapes(cls(cfg).state_dict())
        except Exception:
            continue
        if got == want:
            return cfg, True
    return primary, None


def _tiny(model_type: str, component: str, *args: Any) -> list[Any]:
    cls = config_class(model_type, component)
    return [cls.tiny(*args)] if hasattr(cls, "tiny") else []


def _ordered(sd: Mapping[str, Any]) -> "collections.OrderedDict[str, torch.Tensor]":
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UnknownCheckpointFormatError(f"state-dict entry '{k}' is a {type(v).__name__}, expected a tensor")
        out[k] = v.detach().to("cpu")
    return out


# ------------------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------------------
def _check_exists(path: Path) -> None:
    if not path.exists():
        raise MissingWeightsError(str(path), "checkpoint", WHERE_TO_GET)


def _sniff(path: Path) -> str:
    """'dir', 'zip', 'torch-legacy', 'pickle', 'safetensors' from the first bytes."""
    if path.is_dir():
        return "dir"
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise UnknownCheckpointFormatError(
        f"'{path}' is neither a torch.save file, a pickle, nor a project checkpoint directory "
        f"(first bytes {head[:8]!r}); supported formats: {', '.join(FORMATS)}"
    )


def _encoder_kind(keys: set[str]) -> str | None:
    if any(k.startswith("Ref_encoder.") for k in keys):
        return "3dpe"
    if "Final_encoder.output_net.9.weight" in keys:
        return "live3d-lt"
    if "Final_encoder.output_net.6.weight" in keys:
        return "live3d-normal"
    return None


def _detect_from_object(obj: Any, where: str) -> str:
    if isinstance(obj, Mapping):
        keys = set(obj.keys())
        if "G_ema" in keys:
            return "eg3d-pkl"
        if "G_init_kwargs" in keys or ("G" in keys and "G_init_args" in keys):
            return "eg3d-pth"
        if "encoder_state_dict" in keys and isinstance(obj["encoder_state_dict"], Mapping):
            kind = _encoder_kind(set(obj["encoder_state_dict"].keys()))
            if kind is not None:
                return kind
            raise UnknownCheckpointFormatError(
                f"'{where}' has an encoder_state_dict whose keys match neither 3dpe (Ref_encoder.*) nor Live3D LT/Normal "
                f"(Final_encoder.output_net.9 / .6); first keys: {list(obj['encoder_state_dict'])[:5]}"
            )
        found = ", ".join(repr(k) for k in list(obj.keys())[:12])
        raise UnknownCheckpointFormatError(
            f"'{where}' holds a dict with keys [{found}], which matches no supported format "
            f"({', '.join(FORMATS)}): expected 'G_ema' (EG3D .pkl), 'G_init_kwargs'+'G' (converted EG3D .pth) or "
            "'encoder_state_dict'+'renderer_state_dict' (3dpe.pt / Live3D)"
        )
    raise UnknownCheckpointFormatError(
        f"'{where}' holds a {type(obj).__name__}, not a checkpoint dict; supported formats: {', '.join(FORMATS)}"
    )


def _project_dir(path: Path) -> Path | None:
    if path.is_dir():
        return path if (path / CONFIG_FILE).is_file() else None
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    return None


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of `path` from its content (see FORMATS). Cheap: tensors are not read.

    Raises MissingWeightsError for a missing path, UnknownCheckpointFormatError (saying what was found)
    for anything else, UnsafePickleError for a pickle that asks for a global outside the allow-list.
    """
    from models.safe_unpickle import load_pickle, safe_torch_load

    path = resolve_weights(path)  # a local path, or a Hub id → its cached copy
    _check_exists(path)
    kind = _sniff(path)
    if kind in ("dir", "safetensors"):
        proj = _project_dir(path)
        if proj is None:
            listing = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
            raise UnknownCheckpointFormatError(
                f"'{path}' is not a project checkpoint: no {CONFIG_FILE} (found: {listing})"
            )
        _read_project_config(proj)
        return "threedpe"
    if kind == "pickle":
        return _detect_from_object(load_pickle(path, peek=True), str(path))
    return _detect_from_object(safe_torch_load(path, map_location="meta"), str(path))


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, configs: Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint to CPU state dicts + architecture configs (no model is built).

    `path`: a file, a project folder, or a Hugging Face Hub id `org/name[@rev][/file]` (models/hub.py).
    `configs` (component → config dataclass or dict) overrides the architecture of original formats, which
    store none (by default the original's defaults, or a `tiny()` config when the shapes say so).
    Optimizer states in training checkpoints are ignored.
    """
    from models.safe_unpickle import load_pickle, safe_torch_load

    path = resolve_weights(path)  # a local path, or a Hub id → its cached copy
    _check_exists(path)
    kind = _sniff(path)
    if kind in ("dir", "safetensors"):
        proj = _project_dir(path)
        if proj is None:
            raise UnknownCheckpointFormatError(f"'{path}' is not a project checkpoint: no {CONFIG_FILE}")
        ckpt = load_pretrained(proj)
        if configs:
            for comp, cfg in configs.items():
                if comp in ckpt.components:
                    ckpt.configs[comp] = _as_config(ckpt.model_type, comp, cfg)
        return ckpt
    if kind == "pickle":
        obj = load_pickle(path)
    else:
        try:  # plain torch.save dicts of tensors/opts (3dpe.pt, Live3D) need nothing more
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # EasyDicts (converted EG3D .pth): the restricted unpickler
            obj = safe_torch_load(path)
    fmt = _detect_from_object(obj, str(path))
    configs = dict(configs or {})
    if fmt == "eg3d-pkl":
        ckpt = _from_eg3d_pkl(obj, configs)
    elif fmt == "eg3d-pth":
        ckpt = _from_eg3d_pth(obj, configs)
    else:
        ckpt = _from_training_checkpoint(obj, fmt, configs)
    ckpt.meta["source_path"] = str(path)
    ckpt.meta["source_format"] = fmt
    return ckpt


def _from_training_checkpoint(obj: Mapping[str, Any], fmt: str, configs: dict[str, Any]) -> LoadedCheckpoint:
    model_type = "3dpe" if fmt == "3dpe" else "live3d"
    components: dict[str, Any] = {"encoder": _ordered(obj["encoder_state_dict"])}
    if "renderer_state_dict" in obj:
        components["renderer"] = _ordered(obj["renderer_state_dict"])
    d = obj.get("discriminator_state")
    if isinstance(d, Mapping) and len(d) > 0:
        components["discriminator"] = _ordered(d)
    cfgs: dict[str, Any] = {}
    matched: dict[str, bool | None] = {}
    for comp, sd in components.items():
        override = _as_config(model_type, comp, configs[comp]) if comp in configs else None
        if override is not None:
            cfgs[comp], matched[comp] = override, True
            continue
        cls = config_class(model_type, comp)
        if comp == "encoder" and model_type == "live3d":
            mode = "LT" if fmt == "live3d-lt" else "Normal"
            primary, alternates = cls(mode=mode), _tiny(model_type, comp, mode)
        elif comp == "encoder" and any(k.startswith("Ref_encoder.clip_encoder.") for k in sd):
            primary, alternates = cls(prompt_encoder="clip"), _tiny(model_type, comp, "clip")
        else:
            primary, alternates = cls(), _tiny(model_type, comp)
        cfgs[comp], matched[comp] = _pick_config(model_type, comp, sd, primary, alternates)
    opts = obj.get("opts")
    meta = {
        "step": obj.get("step"),
        "best_val_loss": obj.get("best_val_loss"),
        "opts": dict(opts) if isinstance(opts, Mapping) else opts,
        "config_matched": matched,
    }
    return LoadedCheckpoint(fmt, model_type, components, cfgs, meta)


def _generator_config(init_args: tuple, init_kwargs: dict, nrr: int | None, rendering_kwargs: dict | None,
                      sd: Mapping[str, torch.Tensor], override: Any) -> tuple[Any, bool | None]:
    if override is not None:
        return _as_config("eg3d", "generator", override), True
    from models.eg3d.config import GeneratorConfig

    try:
        primary = GeneratorConfig.from_eg3d_kwargs(tuple(init_args), dict(init_kwargs))
    except Exception as e:
        raise ConfigError(f"cannot read the EG3D generator's init kwargs ({e}); pass the generator config explicitly") from e
    primary = _apply_rendering(primary, nrr, rendering_kwargs)
    alternates = [_apply_rendering(GeneratorConfig.tiny(), nrr, rendering_kwargs)]
    return _pick_config("eg3d", "generator", sd, primary, alternates)


def _apply_rendering(cfg: Any, nrr: int | None, rendering_kwargs: dict | None) -> Any:
    changes: dict[str, Any] = {}
    if nrr is not None and hasattr(cfg, "neural_rendering_resolution"):
        changes["neural_rendering_resolution"] = int(nrr)
    if rendering_kwargs and hasattr(cfg, "rendering"):
        from models.eg3d.config import RenderingConfig

        changes["rendering"] = RenderingConfig.from_eg3d(dict(rendering_kwargs))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _discriminator_config(init_args: tuple, init_kwargs: dict, sd: Mapping[str, torch.Tensor], override: Any,
                          model_type: str = "eg3d") -> tuple[Any, bool | None]:
    if override is not None:
        return _as_config(model_type, "discriminator", override), True
    cls = config_class(model_type, "discriminator")
    try:
        primary = _discriminator_config_from_eg3d(cls, tuple(init_args), dict(init_kwargs))
    except Exception:
        primary = cls()
    return _pick_config(model_type, "discriminator", sd, primary, _tiny(model_type, "discriminator"))


def _discriminator_config_from_eg3d(cls: type, init_args: tuple, kw: dict) -> Any:
    """EG3D `DualDiscriminator(c_dim, img_resolution, img_channels, ...)` kwargs → DiscriminatorConfig."""
    names = ("c_dim", "img_resolution", "img_channels")
    kw = dict(kw)
    for n, v in zip(names, init_args):
        kw.setdefault(n, v)
    fields = {f.name for f in dataclasses.fields(cls)}
    vals: dict[str, Any] = {}
    for n in ("c_dim", "img_resolution", "img_channels", "channel_base", "channel_max", "conv_clamp", "cmap_dim",
              "disc_c_noise", "num_fp16_res"):
        if n in kw and n in fields:
            vals[n] = kw[n]
    mapping = kw.get("mapping_kwargs") or {}
    if "num_layers" in mapping and "mapping_layers" in fields:
        vals["mapping_layers"] = mapping["num_layers"]
    if "lr_multiplier" in mapping and "mapping_lr_multiplier" in fields:
        vals["mapping_lr_multiplier"] = mapping["lr_multiplier"]
    epi = kw.get("epilogue_kwargs") or {}
    for src, dst in (("mbstd_group_size", "mbstd_group_size"), ("mbstd_num_channels", "mbstd_num_channels")):
        if epi.get(src) is not None and dst in fields:
            vals[dst] = epi[src]
    return cls(**vals)


def _from_eg3d_pkl(snap: Mapping[str, Any], configs: dict[str, Any]) -> LoadedCheckpoint:
    from models.safe_unpickle import (
        flatten_persistent_state,
        read_init_args,
        read_init_kwargs,
        read_neural_rendering_resolution,
        read_rendering_kwargs,
        to_plain,
    )

    g = snap["G_ema"]
    g_sd = flatten_persistent_state(g)
    g_args, g_kwargs = read_init_args(g), read_init_kwargs(g)
    nrr, rk = read_neural_rendering_resolution(g), read_rendering_kwargs(g)
    components: dict[str, Any] = {"generator": g_sd}
    cfgs: dict[str, Any] = {}
    matched: dict[str, bool | None] = {}
    cfgs["generator"], matched["generator"] = _generator_config(g_args, g_kwargs, nrr, rk, g_sd, configs.get("generator"))
    eg3d: dict[str, Any] = {"G_init_args": list(g_args), "G_init_kwargs": g_kwargs,
                            "G_neural_rendering_resolution": nrr, "G_rendering_kwargs": rk}
    d = snap.get("D")
    if d is not None:
        d_sd = flatten_persistent_state(d)
        d_args, d_kwargs = read_init_args(d), read_init_kwargs(d)
        components["discriminator"] = d_sd
        cfgs["discriminator"], matched["discriminator"] = _discriminator_config(
            d_args, d_kwargs, d_sd, configs.get("discriminator"))
        eg3d.update(D_init_args=list(d_args), D_init_kwargs=d_kwargs)
    meta = {
        "neural_rendering_resolution": nrr,
        "rendering_kwargs": rk,
        "training_set_kwargs": to_plain(dict(snap.get("training_set_kwargs") or {})),
        "eg3d": eg3d,
        "config_matched": matched,
    }
    return LoadedCheckpoint("eg3d-pkl", "eg3d", components, cfgs, meta)


def _from_eg3d_pth(obj: Mapping[str, Any], configs: dict[str, Any]) -> LoadedCheckpoint:
    from models.safe_unpickle import to_plain

    g_args = tuple(to_plain(obj.get("G_init_args") or ()))
    g_kwargs = to_plain(dict(obj.get("G_init_kwargs") or {}))
    nrr = obj.get("G_neural_rendering_resolution")
    rk = obj.get("G_renderinig_kwargs", obj.get("G_rendering_kwargs"))  # sic: the original spells it 'renderinig'
    rk = to_plain(dict(rk)) if rk is not None else to_plain(dict(g_kwargs.get("rendering_kwargs") or {}))
    g_sd = _ordered(obj["G"])
    added_label_std = False
    if "dataset_label_std" not in g_sd:  # registered by EG3D's training loop only; the .pth's G lacks it
        c_dim = int(g_kwargs.get("c_dim", g_args[1] if len(g_args) > 1 else 25))
        g_sd = collections.OrderedDict([("dataset_label_std", torch.ones(c_dim))] + list(g_sd.items()))
        added_label_std = True
    components: dict[str, Any] = {"generator": g_sd}
    cfgs: dict[str, Any] = {}
    matched: dict[str, bool | None] = {}
    cfgs["generator"], matched["generator"] = _generator_config(
        g_args, g_kwargs, None if nrr is None else int(nrr), rk, g_sd, configs.get("generator"))
    eg3d: dict[str, Any] = {"G_init_args": list(g_args), "G_init_kwargs": g_kwargs,
                            "G_neural_rendering_resolution": None if nrr is None else int(nrr), "G_rendering_kwargs": rk}
    d = obj.get("D")
    d_args = tuple(to_plain(obj.get("D_init_args") or ()))
    d_kwargs = to_plain(dict(obj.get("D_init_kwargs") or {}))
    eg3d.update(D_init_args=list(d_args), D_init_kwargs=d_kwargs)
    if isinstance(d, Mapping) and len(d) > 0:
        components["discriminator"] = _ordered(d)
        cfgs["discriminator"], matched["discriminator"] = _discriminator_config(
            d_args, d_kwargs, components["discriminator"], configs.get("discriminator"))
    meta = {"neural_rendering_resolution": None if nrr is None else int(nrr), "rendering_kwargs": rk, "eg3d": eg3d,
            "added_dataset_label_std": added_label_std, "config_matched": matched}
    return LoadedCheckpoint("eg3d-pth", "eg3d", components, cfgs, meta)


# ------------------------------------------------------------------------------------------------------------
# the project format
# ------------------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


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
    cfg_json = {
        "format": "threedpe",
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "config": {comp: _to_dict(c) for comp, c in config.items() if comp in components},
        "source": _json_safe(dict(source or {})),
    }
    with atomic_directory(dst) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "key_order": json.dumps(order)})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg_json, indent=2) + "\n")
    return dst


def _read_project_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise UnknownCheckpointFormatError(f"'{path / CONFIG_FILE}' is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "threedpe":
        raise UnknownCheckpointFormatError(
            f"'{path / CONFIG_FILE}' is not a project checkpoint config (format={cfg.get('format') if isinstance(cfg, dict) else None!r}, "
            "expected 'threedpe')"
        )
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise UnknownCheckpointFormatError(
            f"'{path}' has format_version {cfg.get('format_version')}, newer than this code ({FORMAT_VERSION}); update the code"
        )
    return cfg


def load_pretrained(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a project-format directory back (state dicts in their original key order, configs as dataclasses)."""
    from safetensors import safe_open

    path = Path(path)
    _check_exists(path)
    cfg = _read_project_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingWeightsError(str(weights), "project checkpoint weights", WHERE_TO_GET)
    model_type = cfg.get("model_type")
    components: dict[str, Any] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        order = json.loads(meta["key_order"]) if "key_order" in meta else {}
        keys = list(f.keys())
        by_comp: dict[str, list[str]] = collections.defaultdict(list)
        for full in keys:
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
    configs = {comp: _as_config(model_type, comp, c) for comp, c in (cfg.get("config") or {}).items() if comp in components}
    source = dict(cfg.get("source") or {})
    meta_out = dict(source)
    meta_out.update(source_path=str(path), source_format="threedpe", config_matched={c: True for c in configs})
    return LoadedCheckpoint("threedpe", model_type, components, configs, meta_out)


def config_dicts(ckpt: LoadedCheckpoint) -> dict[str, dict]:
    """The `config` section of config.json for `ckpt` (component → plain dict)."""
    return {comp: _to_dict(cfg) for comp, cfg in ckpt.configs.items()}


def source_info(ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """Provenance for config.json's `source`: original path/format, step, opts, EG3D kwargs, rendering."""
    keep = ("source_path", "source_format", "step", "best_val_loss", "opts", "neural_rendering_resolution",
            "rendering_kwargs", "eg3d", "training_set_kwargs")
    out = {k: ckpt.meta[k] for k in keep if k in ckpt.meta}
    if "source_path" in out:
        out["path"] = out.pop("source_path")
    if "source_format" in out:
        out["format"] = out.pop("source_format")
    return _json_safe(out)


# ------------------------------------------------------------------------------------------------------------
# building models
# ------------------------------------------------------------------------------------------------------------
def build_models(ckpt: LoadedCheckpoint, components: tuple[str, ...] | None = None,
                 device: str | torch.device | None = None) -> dict[str, nn.Module]:
    """Construct each component's model from its config and load its weights strictly (eval mode).

    Models are built on the CPU unless `device` is given; `device='meta'` checks that the weights fit
    (keys and shapes) without allocating anything. Raises ConfigError when the weights do not fit the
    config (pass `configs=` to `load_checkpoint`, or `--config` to the converter).
    """
    models: dict[str, nn.Module] = {}
    for comp, sd in ckpt.components.items():
        if components is not None and comp not in components:
            continue
        if comp not in ckpt.configs:
            raise ConfigError(f"{ckpt.meta.get('source_path', 'checkpoint')}: no config for component '{comp}'")
        cls = model_class(ckpt.model_type, comp)
        with torch.device(device if device is not None else "cpu"):
            model = cls(ckpt.configs[comp])
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
                model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ConfigError(
                f"{ckpt.meta.get('source_path', 'checkpoint')}: the '{comp}' weights do not fit "
                f"{cls.__name__}({type(ckpt.configs[comp]).__name__}); if the model was trained with a non-default "
                f"architecture, pass its config (load_checkpoint(configs=...) or --config). Details: {str(e)[:800]}"
            ) from e
        if comp == "generator":
            nrr = ckpt.meta.get("neural_rendering_resolution")
            if nrr is not None and hasattr(model, "neural_rendering_resolution"):
                model.neural_rendering_resolution = int(nrr)
        models[comp] = model.eval()
    return models


# ------------------------------------------------------------------------------------------------------------
# writing the original layouts
# ------------------------------------------------------------------------------------------------------------
_ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, foreach=None, maximize=False,
                       capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)


def _cpu_contiguous(sd: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, torch.Tensor]":
    return collections.OrderedDict((k, v.detach().to("cpu").contiguous()) for k, v in sd.items())


def export_original_3dpe(
    path: str | os.PathLike,
    encoder_sd: Mapping[str, torch.Tensor],
    renderer_sd: Mapping[str, torch.Tensor],
    discriminator_sd: Mapping[str, torch.Tensor] | None = None,
    step: int = 0,
    opts: Mapping[str, Any] | None = None,
    encoder_optimizer: Mapping[str, Any] | None = None,
) -> Path:
    """Write the original `3dpe.pt` layout (the 7 keys of checkpoint_top_level.tsv), loadable by the original code.

    `encoder_optimizer` defaults to an AdamW state with no moments over the optimised parameters
    (`Final_encoder.*` then `Ref_encoder.*`, as the original builds it).
    """
    enc = _cpu_contiguous(encoder_sd)
    if encoder_optimizer is None:
        n = sum(1 for k in enc if k.startswith(("Final_encoder.", "Ref_encoder.")))
        lr = float((opts or {}).get("learning_rate_encoder", 1e-4))
        encoder_optimizer = {"state": {}, "param_groups": [dict(lr=lr, **_ADAMW_DEFAULTS, params=list(range(n)))]}
    obj = {
        "encoder_state_dict": enc,
        "renderer_state_dict": _cpu_contiguous(renderer_sd),
        "discriminator_state": _cpu_contiguous(discriminator_sd or {}),
        "opts": dict(opts or {}),
        "best_val_loss": None,
        "step": int(step),
        "encoder_optimizer": dict(encoder_optimizer),
    }
    path = Path(path)
    atomic_torch_save(obj, path)
    return path


def _easydict(obj: Any) -> Any:
    from models.safe_unpickle import EasyDict

    if isinstance(obj, Mapping):
        return EasyDict({k: _easydict(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_easydict(v) for v in obj]
    return obj


def default_eg3d_d_kwargs(g_init_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """EG3D FFHQ `DualDiscriminator` kwargs matching a generator's (used when no D kwargs are known)."""
    return {
        "c_dim": int(g_init_kwargs.get("c_dim", 25)),
        "img_resolution": int(g_init_kwargs.get("img_resolution", 512)),
        "img_channels": int(g_init_kwargs.get("img_channels", 3)),
        "channel_base": int(g_init_kwargs.get("channel_base", 32768)),
        "channel_max": int(g_init_kwargs.get("channel_max", 512)),
        "num_fp16_res": 4,
        "conv_clamp": 256,
        "disc_c_noise": 0.0,
        "block_kwargs": {"freeze_layers": 0},
        "mapping_kwargs": {},
        "epilogue_kwargs": {"mbstd_group_size": 4},
    }


def write_eg3d_pth(
    path: str | os.PathLike,
    G_sd: Mapping[str, torch.Tensor],
    G_init_args: tuple | list = (),
    G_init_kwargs: Mapping[str, Any] | None = None,
    neural_rendering_resolution: int = 128,
    rendering_kwargs: Mapping[str, Any] | None = None,
    D_sd: Mapping[str, torch.Tensor] | None = None,
    D_init_args: tuple | list = (),
    D_init_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the converted EG3D `.pth` the original 3DPE/Live3D code loads (`ffhqrebalanced512-128.pth`).

    Keys: G_init_args, G_init_kwargs (dnnlib EasyDict), G (TriPlaneGenerator state dict without the
    training-loop buffer `dataset_label_std`, which the original's strict load would reject),
    G_neural_rendering_resolution, G_renderinig_kwargs (sic), D_init_args, D_init_kwargs, D.
    """
    from models.safe_unpickle import ORIGINAL_NAMES_PICKLE_MODULE

    g_kwargs = dict(G_init_kwargs or {})
    rk = dict(rendering_kwargs if rendering_kwargs is not None else g_kwargs.get("rendering_kwargs") or {})
    if rk and "rendering_kwargs" not in g_kwargs:
        g_kwargs["rendering_kwargs"] = rk
    g = collections.OrderedDict((k, v) for k, v in _cpu_contiguous(G_sd).items() if k != "dataset_label_std")
    d_kwargs = dict(D_init_kwargs) if D_init_kwargs else default_eg3d_d_kwargs(g_kwargs)
    obj = {
        "G_init_args": tuple(G_init_args),
        "G_init_kwargs": _easydict(g_kwargs),
        "G": g,
        "G_neural_rendering_resolution": int(neural_rendering_resolution),
        "G_renderinig_kwargs": _easydict(rk),
        "D_init_args": tuple(D_init_args),
        "D_init_kwargs": _easydict(d_kwargs),
        "D": _cpu_contiguous(D_sd or {}),
    }
    path = Path(path)
    atomic_torch_save(obj, path, pickle_module=ORIGINAL_NAMES_PICKLE_MODULE)
    return path


def eg3d_kwargs_from_config(cfg: Any) -> tuple[tuple, dict]:
    """(init_args, init_kwargs) of EG3D's `TriPlaneGenerator` for a GeneratorConfig (for `write_eg3d_pth`)."""
    g = cfg
    rendering = _to_dict(g.rendering) if hasattr(g, "rendering") else {}
    rk = {
        "image_resolution": g.img_resolution, "disparity_space_sampling": rendering.get("disparity_space_sampling", False),
        "clamp_mode": rendering.get("clamp_mode", "softplus"),
        "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
        "c_gen_conditioning_zero": rendering.get("c_gen_conditioning_zero", False), "gpc_reg_prob": 0.8,
        "c_scale": rendering.get("c_scale", 1.0), "superresolution_noise_mode": rendering.get("superresolution_noise_mode", "none"),
        "density_reg": 0.25, "density_reg_p_dist": 0.004, "reg_type": "l1", "decoder_lr_mul": 1.0,
        "sr_antialias": rendering.get("sr_antialias", True),
        "depth_resolution": rendering.get("depth_resolution", 48),
        "depth_resolution_importance": rendering.get("depth_resolution_importance", 48),
        "ray_start": rendering.get("ray_start", 2.25), "ray_end": rendering.get("ray_end", 3.3),
        "box_warp": rendering.get("box_warp", 1.0), "avg_camera_radius": rendering.get("avg_camera_radius", 2.7),
        "avg_camera_pivot": list(rendering.get("avg_camera_pivot", [0, 0, 0.2])),
    }
    kwargs = {
        "z_dim": g.z_dim, "c_dim": g.c_dim, "w_dim": g.w_dim, "img_resolution": g.img_resolution,
        "img_channels": g.img_channels, "mapping_kwargs": {"num_layers": g.mapping_layers},
        "channel_base": g.channel_base, "channel_max": g.channel_max, "fused_modconv_default": "inference_only",
        "num_fp16_res": 0, "conv_clamp": None, "sr_num_fp16_res": getattr(g, "sr_num_fp16_res", 4),
        "sr_kwargs": {"channel_base": getattr(g, "sr_channel_base", g.channel_base),
                      "channel_max": getattr(g, "sr_channel_max", g.channel_max),
                      "fused_modconv_default": "inference_only"},
        "rendering_kwargs": rk,
    }
    return (), kwargs


def export_eg3d_pth(ckpt: LoadedCheckpoint, path: str | os.PathLike) -> Path:
    """`write_eg3d_pth` for a loaded EG3D checkpoint (keeps the original init kwargs when known)."""
    if "generator" not in ckpt.components:
        raise ConfigError(f"{ckpt.meta.get('source_path')}: a '{ckpt.model_type}' checkpoint has no EG3D generator")
    eg3d = dict(ckpt.meta.get("eg3d") or {})
    if eg3d.get("G_init_kwargs"):
        g_args, g_kwargs = tuple(eg3d.get("G_init_args") or ()), dict(eg3d["G_init_kwargs"])
    else:
        g_args, g_kwargs = eg3d_kwargs_from_config(ckpt.configs["generator"])
    nrr = ckpt.meta.get("neural_rendering_resolution") or getattr(ckpt.configs.get("generator"), "neural_rendering_resolution", 128)
    rk = ckpt.meta.get("rendering_kwargs") or eg3d.get("G_rendering_kwargs") or g_kwargs.get("rendering_kwargs")
    return write_eg3d_pth(
        path, ckpt.components["generator"], g_args, g_kwargs, int(nrr), rk,
        D_sd=ckpt.components.get("discriminator"), D_init_args=tuple(eg3d.get("D_init_args") or ()),
        D_init_kwargs=eg3d.get("D_init_kwargs") or None,
    )


def export_3dpe_pt(ckpt: LoadedCheckpoint, path: str | os.PathLike) -> Path:
    """`export_original_3dpe` for a loaded 3DPE checkpoint (editing encoder + renderer)."""
    if ckpt.model_type != "3dpe" or "encoder" not in ckpt.components or "renderer" not in ckpt.components:
        raise ConfigError(
            f"{ckpt.meta.get('source_path')}: the 3dpe.pt layout needs a 3dpe editing encoder and a renderer; "
            f"this is a '{ckpt.model_type}' checkpoint with {sorted(ckpt.components)}"
        )
    return export_original_3dpe(path, ckpt.components["encoder"], ckpt.components["renderer"],
                                ckpt.components.get("discriminator"), step=int(ckpt.meta.get("step") or 0),
                                opts=ckpt.meta.get("opts") or {})


def load_eg3d_generator(network: str | os.PathLike, device: torch.device | None = None) -> nn.Module:
    """The one EG3D generator loader: a `TriPlaneGenerator` from an NVIDIA .pkl, a converted .pth or a project
    checkpoint holding one, in eval mode without gradients, on `device` (default CPU)."""
    ckpt = load_checkpoint(network)
    if "generator" not in ckpt.components:
        raise ConfigError(f"'{network}' is a {ckpt.format} checkpoint without an EG3D generator; pass the EG3D .pkl, "
                          "the converted .pth, or a project checkpoint converted from one")
    gen = build_models(ckpt, components=("generator",))["generator"]
    return gen.to(device or torch.device("cpu")).eval().requires_grad_(False)
