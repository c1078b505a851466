"""Readers of the original layouts: 3dpe.pt and Live3D training checkpoints, NVIDIA's EG3D .pkl, the converted .pth.

Each turns the object read from the file into a `LoadedCheckpoint` (CPU state dicts with the original key
names, architecture configs, provenance). The original's training checkpoints record no architecture: each
component gets the one the original code builds (`original_config`; a discriminator of another size is
read off its weights' shapes) unless the caller passes its own (`configs=`). A 3dpe.pt written by this
project records its architecture under the extra top-level key `threedpe_config` (`ARCHITECTURE_KEY`, which
the original code never reads), and that is used instead. EG3D files record their constructor kwargs, which
become the configs.
"""
from __future__ import annotations

import collections
import dataclasses
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.checkpoint.integrity import reading
from models.checkpoint.project import FORMAT_VERSION
from models.checkpoint.registry import (
    LoadedCheckpoint,
    as_config,
    config_class,
    model_class,
    state_dict_differences,
)
from utils.errors import ConfigError, UnknownCheckpointFormatError

ARCHITECTURE_KEY = "threedpe_config"  # value: `project.config_header` (config.json without its source)


def read_file(path: Path, kind: str) -> Any:
    """The object inside an original-format file (`kind` from `detect.sniff`); nothing in it runs.

    CorruptCheckpointError (naming the file) when it is cut short or damaged.
    """
    from models.checkpoint.safe_unpickle import load_pickle, safe_torch_load

    with reading(path):
        if kind == "pickle":
            return load_pickle(path)
        try:  # plain torch.save dicts of tensors/opts (3dpe.pt, Live3D) need nothing more
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # EasyDicts (converted EG3D .pth): the restricted unpickler
            return safe_torch_load(path)


def read_original(obj: Mapping[str, Any], fmt: str, configs: Mapping[str, Any] | None = None,
                  where: str = "checkpoint") -> LoadedCheckpoint:
    """The checkpoint in `obj` (format `fmt` from `detect.format_of`, read from file `where`); `configs`
    overrides architectures."""
    configs = dict(configs or {})
    if fmt == "eg3d-pkl":
        return _from_eg3d_pkl(obj, configs)
    if fmt == "eg3d-pth":
        return _from_eg3d_pth(obj, configs)
    return _from_training_checkpoint(obj, fmt, configs, where)


def recorded_configs(obj: Mapping[str, Any], model_type: str, where: str) -> dict[str, Any]:
    """component → config dataclass from the file's `ARCHITECTURE_KEY` ({} when it has none, as the original's).

    ConfigError naming the file when the entry cannot be read.
    """
    entry = obj.get(ARCHITECTURE_KEY)
    if entry is None:
        return {}
    what = f"'{where}': its '{ARCHITECTURE_KEY}' entry (the architecture this project recorded)"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("config"), Mapping):
        raise ConfigError(f"{what} is not a dict with a 'config' dict; convert the file again or pass the "
                          "architecture (--config ARCH.json)")
    if int(entry.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{what} has format_version {entry.get('format_version')}, newer than this code "
                          f"({FORMAT_VERSION}); update the code")
    try:
        return {comp: as_config(model_type, comp, cfg) for comp, cfg in entry["config"].items()}
    except ConfigError as e:
        raise ConfigError(f"{what} does not fit this code: {e}") from e


def original_config(model_type: str, component: str, fmt: str, sd: Mapping[str, torch.Tensor]) -> Any:
    """The architecture the original code builds for `component` of a `fmt` training checkpoint (full size).

    The only one assumed: weights of another architecture need theirs passed explicitly (`configs=`).
    """
    cls = config_class(model_type, component)
    if component == "encoder" and model_type == "live3d":
        return cls(mode="LT" if fmt == "live3d-lt" else "Normal")
    if component == "encoder" and any(k.startswith("Ref_encoder.clip_encoder.") for k in sd):
        return cls(prompt_encoder="clip")  # this project's CLIP prompt encoder, exported in the 3dpe.pt layout
    return cls()


def _ordered(sd: Mapping[str, Any]) -> collections.OrderedDict[str, torch.Tensor]:
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UnknownCheckpointFormatError(f"state-dict entry '{k}' is a {type(v).__name__}, expected a tensor")
        out[k] = v.detach().to("cpu")
    return out


def _fits(model_type: str, component: str, cfg: Any, sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether `sd` has exactly the keys and shapes of the model `cfg` builds (built on the meta device)."""
    with torch.device("meta"):
        model = model_class(model_type, component)(cfg)
    return not state_dict_differences(model.state_dict(), sd)


def discriminator_config_from_weights(model_type: str, sd: Mapping[str, torch.Tensor]) -> Any | None:
    """The DiscriminatorConfig whose model has exactly the keys and shapes of `sd`, read off the shapes; None
    when they do not determine one. The fields that shapes do not show keep the EG3D FFHQ defaults (which
    are what training builds at every size)."""
    cls = config_class(model_type, "discriminator")
    res = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"b(\d+)\.conv0\.weight", k)))
    if not res or "b4.conv.weight" not in sd or f"b{res[-1]}.fromrgb.weight" not in sd:
        return None
    img_res = res[-1]
    ch = {r: int(sd[f"b{r}.conv0.weight"].shape[0]) for r in res} | {4: int(sd["b4.conv.weight"].shape[0])}
    ch_max = max(ch.values())
    # channels(r) = min(channel_base // r, channel_max): each r below the cap bounds channel_base from below
    below_cap = [c * r for r, c in ch.items() if c < ch_max]
    ch_base = max(below_cap) if below_cap else ch_max * img_res
    fields: dict[str, Any] = dict(img_resolution=img_res, channel_base=ch_base, channel_max=ch_max,
                                  img_channels=int(sd[f"b{img_res}.fromrgb.weight"].shape[1]) // 2,
                                  mbstd_num_channels=int(sd["b4.conv.weight"].shape[1]) - ch[4])
    if "mapping.embed.weight" in sd:
        cmap_dim, c_dim = (int(n) for n in sd["mapping.embed.weight"].shape)
        fields.update(c_dim=c_dim, cmap_dim=None if cmap_dim == ch[4] else cmap_dim,
                      mapping_layers=sum(1 for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k)))
    else:
        fields.update(c_dim=0)
    try:
        cfg = cls(**fields)
        return cfg if _fits(model_type, "discriminator", cfg, sd) else None
    except Exception:  # noqa: BLE001 — shapes that build no discriminator: nothing to read off
        return None


def unrecorded_config(model_type: str, component: str, fmt: str, sd: Mapping[str, torch.Tensor]) -> Any:
    """The architecture of a component the file does not record and the caller did not give: the original's
    (`original_config`), or for a discriminator that does not fit it, the one its weights' shapes show."""
    cfg = original_config(model_type, component, fmt, sd)
    if component == "discriminator" and not _fits(model_type, component, cfg, sd):
        return discriminator_config_from_weights(model_type, sd) or cfg
    return cfg


def _from_training_checkpoint(obj: Mapping[str, Any], fmt: str, configs: dict[str, Any],
                              where: str) -> LoadedCheckpoint:
    model_type = "3dpe" if fmt == "3dpe" else "live3d"
    components: dict[str, Any] = {"encoder": _ordered(obj["encoder_state_dict"])}
    if "renderer_state_dict" in obj:
        components["renderer"] = _ordered(obj["renderer_state_dict"])
    d = obj.get("discriminator_state")
    if isinstance(d, Mapping) and len(d) > 0:
        components["discriminator"] = _ordered(d)
    recorded = recorded_configs(obj, model_type, where)
    cfgs: dict[str, Any] = {}
    matched: dict[str, bool | None] = {}
    for comp, sd in components.items():
        if comp in configs:
            cfgs[comp], matched[comp] = as_config(model_type, comp, configs[comp]), True
        elif comp in recorded:
            cfgs[comp], matched[comp] = recorded[comp], True
        else:
            cfgs[comp], matched[comp] = unrecorded_config(model_type, comp, fmt, sd), None
    opts = obj.get("opts")
    meta = {
        "step": obj.get("step"),
        "best_val_loss": obj.get("best_val_loss"),
        "opts": dict(opts) if isinstance(opts, Mapping) else opts,
        "config_matched": matched,
    }
    return LoadedCheckpoint(fmt, model_type, components, cfgs, meta)


def _generator_config(init_args: tuple, init_kwargs: dict, nrr: int | None, rendering_kwargs: dict | None,
                      override: Any) -> tuple[Any, bool | None]:
    if override is not None:
        return as_config("eg3d", "generator", override), True
    from models.eg3d.config import GeneratorConfig

    try:
        cfg = GeneratorConfig.from_eg3d_kwargs(tuple(init_args), dict(init_kwargs))
    except Exception as e:
        raise ConfigError(f"cannot read the EG3D generator's init kwargs ({e}); pass the generator config explicitly") from e
    return _apply_rendering(cfg, nrr, rendering_kwargs), (True if init_args or init_kwargs else None)


def _apply_rendering(cfg: Any, nrr: int | None, rendering_kwargs: dict | None) -> Any:
    changes: dict[str, Any] = {}
    if nrr is not None and hasattr(cfg, "neural_rendering_resolution"):
        changes["neural_rendering_resolution"] = int(nrr)
    if rendering_kwargs and hasattr(cfg, "rendering"):
        from models.eg3d.config import RenderingConfig

        changes["rendering"] = RenderingConfig.from_eg3d(dict(rendering_kwargs))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _discriminator_config(init_args: tuple, init_kwargs: dict, override: Any) -> tuple[Any, bool | None]:
    if override is not None:
        return as_config("eg3d", "discriminator", override), True
    cls = config_class("eg3d", "discriminator")
    if not (init_args or init_kwargs):
        return cls(), None
    try:
        return _discriminator_config_from_eg3d(cls, tuple(init_args), dict(init_kwargs)), True
    except Exception:
        return cls(), None


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


def _generator_entry(g_sd: Mapping[str, torch.Tensor], g_args: tuple, g_kwargs: dict[str, Any], nrr: int | None,
                     rk: dict[str, Any], configs: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """The generator's part of an EG3D checkpoint (.pkl or .pth): (components, configs, config_matched, eg3d meta)."""
    cfgs: dict[str, Any] = {}
    matched: dict[str, bool | None] = {}
    cfgs["generator"], matched["generator"] = _generator_config(g_args, g_kwargs, nrr, rk, configs.get("generator"))
    eg3d: dict[str, Any] = {"G_init_args": list(g_args), "G_init_kwargs": g_kwargs,
                            "G_neural_rendering_resolution": nrr, "G_rendering_kwargs": rk}
    return {"generator": g_sd}, cfgs, matched, eg3d


def _from_eg3d_pkl(snap: Mapping[str, Any], configs: dict[str, Any]) -> LoadedCheckpoint:
    from models.checkpoint.safe_unpickle import (
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
    components, cfgs, matched, eg3d = _generator_entry(g_sd, g_args, g_kwargs, nrr, rk, configs)
    d = snap.get("D")
    if d is not None:
        d_sd = flatten_persistent_state(d)
        d_args, d_kwargs = read_init_args(d), read_init_kwargs(d)
        components["discriminator"] = d_sd
        cfgs["discriminator"], matched["discriminator"] = _discriminator_config(
            d_args, d_kwargs, configs.get("discriminator"))
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
    from models.checkpoint.safe_unpickle import to_plain

    g_args = tuple(to_plain(obj.get("G_init_args") or ()))
    g_kwargs = to_plain(dict(obj.get("G_init_kwargs") or {}))
    nrr = obj.get("G_neural_rendering_resolution")
    nrr = None if nrr is None else int(nrr)
    rk = obj.get("G_renderinig_kwargs", obj.get("G_rendering_kwargs"))  # sic: the original spells it 'renderinig'
    rk = to_plain(dict(rk)) if rk is not None else to_plain(dict(g_kwargs.get("rendering_kwargs") or {}))
    g_sd = _ordered(obj["G"])
    added_label_std = False
    if "dataset_label_std" not in g_sd:  # registered by EG3D's training loop only; the .pth's G lacks it
        c_dim = int(g_kwargs.get("c_dim", g_args[1] if len(g_args) > 1 else 25))
        g_sd = collections.OrderedDict([("dataset_label_std", torch.ones(c_dim))] + list(g_sd.items()))
        added_label_std = True
    components, cfgs, matched, eg3d = _generator_entry(g_sd, g_args, g_kwargs, nrr, rk, configs)
    d = obj.get("D")
    d_args = tuple(to_plain(obj.get("D_init_args") or ()))
    d_kwargs = to_plain(dict(obj.get("D_init_kwargs") or {}))
    eg3d.update(D_init_args=list(d_args), D_init_kwargs=d_kwargs)
    if isinstance(d, Mapping) and len(d) > 0:
        components["discriminator"] = _ordered(d)
        cfgs["discriminator"], matched["discriminator"] = _discriminator_config(
            d_args, d_kwargs, configs.get("discriminator"))
    meta = {"neural_rendering_resolution": nrr, "rendering_kwargs": rk, "eg3d": eg3d,
            "added_dataset_label_std": added_label_std, "config_matched": matched}
    return LoadedCheckpoint("eg3d-pth", "eg3d", components, cfgs, meta)
