"""The w-free triplane renderer of Live3D/3DPE: triplane + cameras → images.

Parameters (state-dict order as in the original `renderer_state_dict`): `const` [1, 1, w_dim] (the learned
style that drives the super-resolution), `decoder` (OSGDecoder), `superresolution` (fp32, noise 'none').
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.eg3d.config import RendererConfig
from models.eg3d.decoder import OSGDecoder
from models.eg3d.renderer import ImportanceRenderer
from models.eg3d.superresolution import SuperresolutionHybrid8XDC

__all__ = ["TriplaneRenderer"]


class TriplaneRenderer(nn.Module):
    """forward(planes, cameras) → {'image', 'image_raw', 'image_depth', 'feature_image'}.

    In eval mode without gradients the super-resolution runs on cached modulated weights (the style is the
    constant `const`), recomputed whenever a parameter changes.
    """

    def __init__(self, cfg: RendererConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or RendererConfig()
        self.neural_rendering_resolution = cfg.neural_rendering_resolution
        self.plane_channels = cfg.plane_channels
        self.const = nn.Parameter(torch.randn([1, 1, cfg.w_dim]))
        self.decoder = OSGDecoder(cfg.plane_channels, cfg.decoder_hidden, cfg.plane_channels, cfg.decoder_lr_mul)
        self.superresolution = SuperresolutionHybrid8XDC(
            channels=cfg.plane_channels, img_resolution=cfg.img_resolution, sr_num_fp16_res=0,
            sr_antialias=cfg.rendering.sr_antialias, channel_base=cfg.sr_channel_base,
            channel_max=cfg.sr_channel_max, w_dim=cfg.w_dim, fused_modconv_default="inference_only")
        self.superresolution.channels_last = cfg.sr_channels_last
        self.renderer = ImportanceRenderer(cfg.rendering)

    def _planes5d(self, planes: torch.Tensor) -> torch.Tensor:
        if planes.ndim == 4:
            n, c, h, w = planes.shape
            if c % 3 != 0 or c // 3 != self.plane_channels:
                raise ValueError(f"planes must have 3×{self.plane_channels} channels, got {c}")
            return planes.reshape(n, 3, c // 3, h, w)
        if planes.ndim == 5 and planes.shape[1] == 3:
            return planes
        raise ValueError(f"planes must be [N, 96, H, W] or [N, 3, 32, H, W], got {tuple(planes.shape)}")

    def render_features(self, planes: torch.Tensor, cameras: torch.Tensor, deterministic: bool = True,
                        generator: torch.Generator | None = None,
                        neural_rendering_resolution: int | None = None) -> dict[str, torch.Tensor]:
        """Neural rendering only: {'feature_image' [V, C, R, R], 'image_raw' [V, 3, R, R], 'image_depth' [V, 1, R, R]}."""
        res = int(neural_rendering_resolution or self.neural_rendering_resolution)
        return self.renderer.render_images(self._planes5d(planes), self.decoder, cameras, res, deterministic, generator)

    def forward(self, planes: torch.Tensor, cameras: torch.Tensor, deterministic: bool = True,
                generator: torch.Generator | None = None,
                neural_rendering_resolution: int | None = None) -> dict[str, torch.Tensor]:
        """Render.

        planes: [N, 96, H, W] (or [N, 3, 32, H, W]) float; cameras: [N, 25], or [V, 25] with N == 1 (one triplane,
        V views in one batched call). Returns 'image' [V, 3, 512, 512] (SR output, unclamped ≈[-1, 1]),
        'image_raw' [V, 3, 128, 128] ([-1, 1]), 'image_depth' [V, 1, 128, 128] (ray distance, within [2.25, 3.3]),
        'feature_image' [V, 32, 128, 128].
        """
        out = self.render_features(planes, cameras, deterministic, generator, neural_rendering_resolution)
        ws = self.const.expand(1, 3, -1)  # one style for every view: SR weights are shared (and cached in eval)
        feats, raw = out["feature_image"], out["image_raw"]
        sr_batch = self.config.sr_batch
        step = sr_batch if sr_batch > 0 else (1 if feats.device.type == "cpu" else feats.shape[0])
        if step >= feats.shape[0]:
            out["image"] = self.superresolution(raw, feats, ws, noise_mode="none")
        else:  # on CPU one view at a time keeps the 512² activations in cache-friendlier sizes
            out["image"] = torch.cat([self.superresolution(raw[i:i + step], feats[i:i + step], ws, noise_mode="none")
                                      for i in range(0, feats.shape[0], step)])
        return out

    def sample_density(self, planes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Raw density at world points (for meshing): planes [N, 96, H, W], coords [N, P, 3] → sigma [N, P, 1]."""
        return self.renderer.run_model(self._planes5d(planes), self.decoder, coords)["sigma"]
