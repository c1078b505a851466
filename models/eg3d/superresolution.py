"""EG3D's SuperresolutionHybrid8XDC: neural render (R², 32 features) → image (4R... 512²).

Two StyleGAN2 'skip' synthesis blocks, both driven by the LAST w (`ws[:, -1:]`) repeated 3 times:
block0 channels→256 at 2·in_res, block1 256→128 at 4·in_res = img_resolution (is_last).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.eg3d.stylegan2 import SynthesisBlock

__all__ = ["SuperresolutionHybrid8XDC"]


class SuperresolutionHybrid8XDC(nn.Module):
    """Super-resolution used by the FFHQ-512 EG3D models and the 3DPE/Live3D renderer.

    `channel_base` is ignored (as in the original); `channel_max` only caps the hidden widths
    (min(256, channel_max), min(128, channel_max // 2)) so tiny test configs stay small — the original
    widths 256/128 are kept for channel_max ≥ 256. `sr_num_fp16_res > 0` → fp16 blocks on CUDA and
    conv_clamp=256 (also in fp32), as in EG3D.
    """

    def __init__(
        self,
        channels: int = 32,
        img_resolution: int = 512,
        sr_num_fp16_res: int = 0,
        sr_antialias: bool = True,
        channel_base: int = 32768,
        channel_max: int = 512,
        w_dim: int = 512,
        **block_kwargs: Any,
    ):
        super().__init__()
        if img_resolution % 4 != 0:
            raise ValueError("img_resolution must be divisible by 4")
        block_kwargs.pop("num_fp16_res", None)
        block_kwargs.pop("conv_clamp", None)
        use_fp16 = sr_num_fp16_res > 0
        conv_clamp = 256 if use_fp16 else None
        self.input_resolution = img_resolution // 4
        self.img_resolution = img_resolution
        self.sr_antialias = sr_antialias
        # Run the feature path in channels_last (faster oneDNN convolutions on CPU, same maths); set by the owner.
        self.channels_last = False
        c0 = min(256, channel_max)
        c1 = min(128, max(channel_max // 2, 1))
        self.block0 = SynthesisBlock(channels, c0, w_dim=w_dim, resolution=img_resolution // 2, img_channels=3,
                                     is_last=False, use_fp16=use_fp16, conv_clamp=conv_clamp, **block_kwargs)
        self.block1 = SynthesisBlock(c0, c1, w_dim=w_dim, resolution=img_resolution, img_channels=3,
                                     is_last=True, use_fp16=use_fp16, conv_clamp=conv_clamp, **block_kwargs)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        """rgb [N, 3, R, R] and features x [N, channels, R, R] (resized to input_resolution if R differs);
        ws [N or 1, k, w_dim]. Returns the image [N, 3, img_resolution, img_resolution] (unclamped, ≈[-1, 1])."""
        ws = ws[:, -1:, :].expand(-1, 3, -1)
        if x.shape[-1] != self.input_resolution or x.shape[-2] != self.input_resolution:
            size = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, rgb = self.block0(x, rgb, ws, **block_kwargs)
        x, rgb = self.block1(x, rgb, ws, **block_kwargs)
        return rgb
