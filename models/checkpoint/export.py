"""Writers of the original layouts, for the original code: `3dpe.pt` and the converted EG3D `.pth`.

    export_3dpe_pt(load_checkpoint("pretrained_models/3dpe-finetuned"), "out/3dpe.pt")
    export_eg3d_pth(load_checkpoint("ffhqrebalanced512-128.pkl"), "ffhqrebalanced512-128.pth")

Writes are atomic (`utils.atomic.atomic_torch_save`); tensors are stored contiguous on the CPU.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.checkpoint.original import ARCHITECTURE_KEY
from models.checkpoint.project import config_header
from models.checkpoint.registry import LoadedCheckpoint, config_to_dict
from utils.atomic import atomic_torch_save
from utils.errors import ConfigError

_ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, foreach=None, maximize=False,
                       capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)


def _cpu_contiguous(sd: Mapping[str, torch.Tensor]) -> collections.OrderedDict[str, torch.Tensor]:
    return collections.OrderedDict((k, v.detach().to("cpu").contiguous()) for k, v in sd.items())


def export_original_3dpe(
    path: str | os.PathLike,
    encoder_sd: Mapping[str, torch.Tensor],
    renderer_sd: Mapping[str, torch.Tensor],
    discriminator_sd: Mapping[str, torch.Tensor] | None = None,
    step: int = 0,
    opts: Mapping[str, Any] | None = None,
    encoder_optimizer: Mapping[str, Any] | None = None,
    configs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the original `3dpe.pt` layout (the 7 keys of checkpoint_top_level.tsv), loadable by the original code.

    `encoder_optimizer` defaults to an AdamW state with no moments over the optimised parameters
    (`Final_encoder.*` then `Ref_encoder.*`, as the original builds it).
    `configs` (component → config dataclass or dict: 'encoder', 'renderer', 'discriminator') records the
    architecture after the 7 keys, under `threedpe_config` (`project.config_header`), so the file loads
    back at any size with no extra flag; the original code reads only the keys it knows and ignores it. Every
    writer of this project passes it; without it the file is exactly the original's (and loads with the
    original's full-size architecture assumed).
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
    if configs:
        written = {"encoder", "renderer"} | ({"discriminator"} if discriminator_sd else set())
        obj[ARCHITECTURE_KEY] = config_header("3dpe", {c: v for c, v in configs.items() if c in written})
    path = Path(path)
    atomic_torch_save(obj, path)
    return path


def _easydict(obj: Any) -> Any:
    from models.checkpoint.safe_unpickle import EasyDict

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
    from models.checkpoint.safe_unpickle import ORIGINAL_NAMES_PICKLE_MODULE

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
    rendering = config_to_dict(g.rendering) if hasattr(g, "rendering") else {}
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
    """`export_original_3dpe` for a loaded 3DPE checkpoint (editing encoder + renderer, and the discriminator
    when it has one), with its architecture configs recorded (check assumed ones first: `build_models(ckpt,
    device='meta')`)."""
    if ckpt.model_type != "3dpe" or "encoder" not in ckpt.components or "renderer" not in ckpt.components:
        raise ConfigError(
            f"{ckpt.meta.get('source_path')}: the 3dpe.pt layout needs a 3dpe editing encoder and a renderer; "
            f"this is a '{ckpt.model_type}' checkpoint with {sorted(ckpt.components)}"
        )
    return export_original_3dpe(path, ckpt.components["encoder"], ckpt.components["renderer"],
                                ckpt.components.get("discriminator"), step=int(ckpt.meta.get("step") or 0),
                                opts=ckpt.meta.get("opts") or {}, configs=ckpt.configs)
