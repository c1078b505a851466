"""Configs of the EG3D generator and the w-free triplane renderer (defaults = EG3D FFHQ-512 values)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["RenderingConfig", "GeneratorConfig", "RendererConfig"]


@dataclass
class RenderingConfig:
    """EG3D `rendering_kwargs` that change rendering (FFHQ values). Training-only keys (density_reg, …) are ignored."""

    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    clamp_mode: Literal["softplus"] = "softplus"  # EG3D's MipRayMarcher2 (the only one here)
    white_back: bool = False
    disparity_space_sampling: bool = False
    density_noise: float = 0.0
    avg_camera_radius: float = 2.7
    avg_camera_pivot: tuple[float, float, float] = (0.0, 0.0, 0.2)
    superresolution_noise_mode: Literal["random", "const", "none"] = "none"
    sr_antialias: bool = True
    c_gen_conditioning_zero: bool = False
    c_scale: float = 1.0
    # Rays processed together in one pass of sampling → decoding → marching (memory/cache only, no numeric effect).
    ray_chunk: int = 2048

    @classmethod
    def from_eg3d(cls, d: dict[str, Any]) -> "RenderingConfig":
        """From an EG3D/3DPE `rendering_kwargs` dict; unknown keys (density_reg, superresolution_module, …) are ignored.

        A missing `c_scale` means 0 in EG3D's mapping (`rendering_kwargs.get('c_scale', 0)`); that is kept.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "avg_camera_pivot" in kw:
            kw["avg_camera_pivot"] = tuple(float(v) for v in kw["avg_camera_pivot"])
        for k in ("ray_start", "ray_end"):
            if k in kw and isinstance(kw[k], str):
                raise NotImplementedError("ray_start/ray_end 'auto' (shapenet) is not supported")
        if "c_scale" not in d:
            kw["c_scale"] = 0.0
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "RenderingConfig":
        return cls(depth_resolution=8, depth_resolution_importance=8)


@dataclass
class GeneratorConfig:
    """TriPlaneGenerator (EG3D FFHQ-512: ffhqrebalanced512-128)."""

    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    img_resolution: int = 512
    img_channels: int = 3
    mapping_layers: int = 2
    channel_base: int = 32768
    channel_max: int = 512
    plane_resolution: int = 256
    plane_channels: int = 32
    # The released model uses 4 (fp16 SR blocks on CUDA and conv_clamp=256); 0 = pure fp32, no clamp.
    sr_num_fp16_res: int = 0
    sr_channel_base: int = 32768
    sr_channel_max: int = 512
    neural_rendering_resolution: int = 128
    decoder_hidden: int = 64
    decoder_lr_mul: float = 1.0
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    rendering: RenderingConfig = field(default_factory=RenderingConfig)

    ORIGINAL_SR_NUM_FP16_RES = 4

    @classmethod
    def from_eg3d_kwargs(cls, init_args: tuple, init_kwargs: dict[str, Any]) -> "GeneratorConfig":
        """From the pickled/converted `G_init_args`/`G_init_kwargs` of EG3D's TriPlaneGenerator."""
        names = ["z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"]
        kw: dict[str, Any] = dict(zip(names, init_args))
        kw.update({k: v for k, v in init_kwargs.items() if k in names})
        cfg = cls(**{k: int(v) for k, v in kw.items()})
        mk = init_kwargs.get("mapping_kwargs", {}) or {}
        cfg.mapping_layers = int(mk.get("num_layers", cfg.mapping_layers))
        cfg.channel_base = int(init_kwargs.get("channel_base", cfg.channel_base))
        cfg.channel_max = int(init_kwargs.get("channel_max", cfg.channel_max))
        cfg.num_fp16_res = int(init_kwargs.get("num_fp16_res", cfg.num_fp16_res))
        cfg.conv_clamp = init_kwargs.get("conv_clamp", cfg.conv_clamp)
        cfg.sr_num_fp16_res = int(init_kwargs.get("sr_num_fp16_res", 0))
        sk = init_kwargs.get("sr_kwargs", {}) or {}
        cfg.sr_channel_base = int(sk.get("channel_base", cfg.sr_channel_base))
        cfg.sr_channel_max = int(sk.get("channel_max", cfg.sr_channel_max))
        rk = init_kwargs.get("rendering_kwargs", {}) or {}
        cfg.decoder_lr_mul = float(rk.get("decoder_lr_mul", 1.0))
        cfg.rendering = RenderingConfig.from_eg3d(rk) if rk else RenderingConfig()
        if "image_resolution" in rk and int(rk["image_resolution"]) != cfg.img_resolution:
            cfg.img_resolution = int(rk["image_resolution"])
        return cfg

    @classmethod
    def tiny(cls) -> "GeneratorConfig":
        """Same key names (so the 256² plane resolution, which fixes the block list), tiny widths: backbone
        channels min(1024/res, 16), 16² rays → 64² image, 8+8 samples."""
        return cls(z_dim=16, w_dim=16, img_resolution=64, channel_base=1024, channel_max=16, plane_resolution=256,
                   plane_channels=32, sr_channel_max=16, neural_rendering_resolution=16,
                   rendering=RenderingConfig.tiny())


@dataclass
class RendererConfig:
    """The w-free TriplaneRenderer of Live3D/3DPE (SR driven by the learned `const`, fp32, noise 'none')."""

    img_resolution: int = 512
    plane_channels: int = 32
    neural_rendering_resolution: int = 128
    w_dim: int = 512
    sr_channel_base: int = 32768
    sr_channel_max: int = 512
    decoder_hidden: int = 64
    decoder_lr_mul: float = 1.0
    # Run the super-resolution features in channels_last memory format (faster on CPU; same maths).
    sr_channels_last: bool = True
    # Views per super-resolution call (0 = auto: 1 on CPU, all on GPU). Memory/speed only.
    sr_batch: int = 0
    rendering: RenderingConfig = field(default_factory=RenderingConfig)

    @classmethod
    def tiny(cls) -> "RendererConfig":
        return cls(img_resolution=64, neural_rendering_resolution=16, w_dim=16, sr_channel_max=16,
                   rendering=RenderingConfig.tiny())
