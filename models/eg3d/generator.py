"""EG3D's TriPlaneGenerator: z, c → ws → triplanes (StyleGAN2 backbone) → volume render → super-resolution.

State-dict keys/order equal EG3D's G_ema (`dataset_label_std`, `backbone.synthesis.*`, `backbone.mapping.*`,
`superresolution.*`, `decoder.*`). Unlike the original, `synthesis(..., neural_rendering_resolution=X)` does
not overwrite `self.neural_rendering_resolution`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from models.eg3d.config import GeneratorConfig
from models.eg3d.decoder import OSGDecoder
from models.eg3d.renderer import ImportanceRenderer
from models.eg3d.stylegan2 import MappingNetwork, SynthesisNetwork
from models.eg3d.superresolution import SuperresolutionHybrid8XDC

__all__ = ["StyleGAN2Backbone", "TriPlaneGenerator"]


class StyleGAN2Backbone(nn.Module):
    """`backbone` of EG3D: `synthesis` (ws → planes [N, 3·C, R, R]) and `mapping` (z, c → ws)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.synthesis = SynthesisNetwork(
            w_dim=cfg.w_dim, img_resolution=cfg.plane_resolution, img_channels=3 * cfg.plane_channels,
            channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res,
            conv_clamp=cfg.conv_clamp, fused_modconv_default="inference_only")
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, num_ws=self.num_ws,
                                      num_layers=cfg.mapping_layers)


class TriPlaneGenerator(nn.Module):
    """EG3D generator (FFHQ-512 config by default)."""

    def __init__(self, cfg: GeneratorConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or GeneratorConfig()
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution = cfg.img_resolution
        self.neural_rendering_resolution = cfg.neural_rendering_resolution
        self.register_buffer("dataset_label_std", torch.ones([cfg.c_dim]))  # stored by EG3D's training loop; unused
        self.renderer = ImportanceRenderer(cfg.rendering)
        self.backbone = StyleGAN2Backbone(cfg)
        self.superresolution = SuperresolutionHybrid8XDC(
            channels=cfg.plane_channels, img_resolution=cfg.img_resolution, sr_num_fp16_res=cfg.sr_num_fp16_res,
            sr_antialias=cfg.rendering.sr_antialias, channel_base=cfg.sr_channel_base,
            channel_max=cfg.sr_channel_max, w_dim=cfg.w_dim, fused_modconv_default="inference_only")
        self.superresolution.channels_last = True
        self.decoder = OSGDecoder(cfg.plane_channels, cfg.decoder_hidden, cfg.plane_channels, cfg.decoder_lr_mul)

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """z [N, z_dim], c [N, 25] (the conditioning camera) → ws [N, num_ws, w_dim] (14×512 for FFHQ)."""
        r = self.config.rendering
        if r.c_gen_conditioning_zero:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * r.c_scale, truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def synthesize_planes(self, ws: torch.Tensor, noise_mode: str = "const",
                          generator: torch.Generator | None = None, **synthesis_kwargs: Any) -> torch.Tensor:
        """ws [N, num_ws, w_dim] → triplanes [N, 3·32, 256, 256] (channel k → plane k // 32)."""
        kw = dict(synthesis_kwargs)
        if generator is not None:
            kw["generator"] = generator
        return self.backbone.synthesis(ws, noise_mode=noise_mode, **kw)

    def render_planes(self, planes: torch.Tensor, c: torch.Tensor, ws: torch.Tensor, deterministic: bool = True,
                      neural_rendering_resolution: int | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """planes [N, 96, H, W], cameras c [N, 25], ws [N, num_ws, w_dim] → {'image' [N, 3, 512, 512],
        'image_raw' [N, 3, R, R], 'image_depth' [N, 1, R, R], 'feature_image' [N, 32, R, R]}."""
        n = planes.shape[0]
        planes5 = planes.reshape(n, 3, -1, planes.shape[-2], planes.shape[-1])
        res = int(neural_rendering_resolution or self.neural_rendering_resolution)
        out = self.renderer.render_images(planes5, self.decoder, c, res, deterministic, generator)
        out["image"] = self.superresolution(out["image_raw"], out["feature_image"], ws,
                                            noise_mode=self.config.rendering.superresolution_noise_mode)
        return out

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, noise_mode: str = "const", deterministic: bool = True,
                  neural_rendering_resolution: int | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """ws, render cameras c [N, 25] → {'image', 'image_raw', 'image_depth', 'feature_image', 'planes'}."""
        planes = self.synthesize_planes(ws, noise_mode=noise_mode, generator=generator)
        out = self.render_planes(planes, c, ws, deterministic, neural_rendering_resolution, generator)
        out["planes"] = planes
        return out

    def sample_mixed(self, coordinates: torch.Tensor, ws: torch.Tensor, noise_mode: str = "const") -> dict:
        """Decode at world points [N, P, 3] → {'sigma' [N, P, 1] raw, 'rgb' [N, P, 32]} (for meshing)."""
        planes = self.synthesize_planes(ws, noise_mode=noise_mode)
        n = planes.shape[0]
        planes5 = planes.reshape(n, 3, -1, planes.shape[-2], planes.shape[-1])
        return self.renderer.run_model(planes5, self.decoder, coordinates)

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const", deterministic: bool = True,
                neural_rendering_resolution: int | None = None, update_emas: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """z [N, z_dim], c [N, 25] (used for conditioning and rendering, as in EG3D) → synthesis outputs."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas)
        return self.synthesis(ws, c, noise_mode, deterministic, neural_rendering_resolution, generator)
