"""EG3D dual discriminator and the reference-conditioned variant 3DPE trains.

Both see 6 channels at `img_resolution`: EG3D's `DualDiscriminator` gets the image ++ the antialiased
upsample of the raw (neural-rendering) image; 3DPE's `EditingDualDiscriminator` gets the image ++ the
reference image of the edit. Both are conditioned on the 25-d camera through a mapping network
(c → cmap, 8 FC layers) projected against the epilogue's output. State-dict keys and shapes equal
EG3D's (tests/data/dual_discriminator*_state_dict.tsv for the full config).

Architecture ('resnet'): per resolution r = R, R/2, ..., 8 a block
    [fromrgb 1×1 (first block only)] → conv0 3×3 → conv1 3×3 ↓2, plus skip 1×1 ↓2 (no bias), both ×√½,
channels min(channel_base / r, channel_max); then the epilogue at 4×4: minibatch-std (group 4, 1 channel)
→ conv 3×3 → fc → out (cmap_dim) → ⟨x, cmap⟩ / √cmap_dim. lrelu activations, conv clamp 256.
Runs in fp32 (the original's fp16 top resolutions are a CUDA speed mode, not needed for correctness).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.eg3d.ops import setup_filter
from models.eg3d.stylegan2 import Conv2dLayer, FullyConnectedLayer, normalize_2nd_moment


@dataclass
class DiscriminatorConfig:
    """Defaults = EG3D FFHQ-512 D (as built by 3DPE from `D_init_kwargs`)."""

    c_dim: int = 25
    img_resolution: int = 512
    img_channels: int = 3              # per stream; the network sees 2× this
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: float | None = 256.0
    cmap_dim: int | None = None        # None: channels at 4×4
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    disc_c_noise: float = 0.0
    num_fp16_res: int = 4              # recorded from the original; this implementation runs fp32

    @classmethod
    def tiny(cls, img_resolution: int = 64) -> "DiscriminatorConfig":
        """Few channels, 2 mapping layers, same key names (fast tests)."""
        return cls(img_resolution=img_resolution, channel_base=256, channel_max=32, mapping_layers=2)

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


class CameraMapping(nn.Module):
    """c N×c_dim → cmap N×w_dim: embed FC, 2nd-moment normalisation, `num_layers` lrelu FCs (lr ×0.01)."""

    def __init__(self, c_dim: int, w_dim: int, num_layers: int = 8, lr_multiplier: float = 0.01):
        super().__init__()
        self.num_layers = num_layers
        self.embed = FullyConnectedLayer(c_dim, w_dim)
        for i in range(num_layers):
            layer = FullyConnectedLayer(w_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier)
            setattr(self, f"fc{i}", layer)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = normalize_2nd_moment(self.embed(c.to(torch.float32)))
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x


class DiscriminatorBlock(nn.Module):
    """ResNet D block at resolution `res`: (x N×in×res², img N×C×res²) → N×out×(res/2)²."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int,
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation="lrelu", conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation="lrelu", down=2, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None) -> torch.Tensor:
        if self.in_channels == 0:
            y = self.fromrgb(img.to(torch.float32))
            x = y if x is None else x + y
        g = math.sqrt(0.5)
        y = self.skip(x, gain=g)
        x = self.conv1(self.conv0(x), gain=g)
        return y + x


class MinibatchStdLayer(nn.Module):
    """Append the std over groups of `group_size` samples (averaged over channels/pixels) as extra channels."""

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        G = min(self.group_size, N) if self.group_size else N
        if N % G:
            raise ValueError(f"minibatch-std: batch {N} is not a multiple of the group size {G}")
        Fc = self.num_channels
        y = x.reshape(G, -1, Fc, C // Fc, H, W)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, Fc, 1, 1)
        y = y.repeat(G, 1, H, W)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4×4 head: x N×C×4×4 (+ cmap N×cmap_dim) → logits N×1."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int = 4, mbstd_group_size: int = 4,
                 mbstd_num_channels: int = 1, conv_clamp: float | None = None):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation="lrelu",
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class _DualBase(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.config = cfg
        self.c_dim = cfg.c_dim
        log2 = int(math.log2(cfg.img_resolution))
        if 2**log2 != cfg.img_resolution or log2 < 3:
            raise ValueError(f"img_resolution must be a power of two ≥ 8, got {cfg.img_resolution}")
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        cmap_dim = cfg.channels(4) if cfg.cmap_dim is None else cfg.cmap_dim
        if cfg.c_dim == 0:
            cmap_dim = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(
                cfg.channels(res) if res < cfg.img_resolution else 0,
                cfg.channels(res), cfg.channels(res // 2), 2 * cfg.img_channels, cfg.conv_clamp,
            )
            setattr(self, f"b{res}", block)
        if cfg.c_dim > 0:
            self.mapping = CameraMapping(cfg.c_dim, cmap_dim, cfg.mapping_layers, cfg.mapping_lr_multiplier)
        self.b4 = DiscriminatorEpilogue(cfg.channels(4), cmap_dim, 4, cfg.mbstd_group_size, cfg.mbstd_num_channels,
                                        cfg.conv_clamp)
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))

    def _run(self, img: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img if x is None else None)
        cmap = None
        if self.c_dim > 0:
            if self.config.disc_c_noise > 0:
                c = c + torch.randn_like(c) * c.std(0) * self.config.disc_c_noise
            cmap = self.mapping(c)
        return self.b4(x, cmap)


class EditingDualDiscriminator(_DualBase):
    """3DPE's `DualDiscriminator_Editing`: D(image ++ reference | camera).

    forward(image N×3×R², reference N×3×R² (both [-1,1]), c N×25) → logits N×1 (real > 0).
    """

    def forward(self, image: torch.Tensor, reference: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._run(torch.cat([image, reference], dim=1), c)


class DualDiscriminator(_DualBase):
    """EG3D's `DualDiscriminator`: D(image ++ upsampled raw image | camera).

    forward(image N×3×R², image_raw N×3×r², c N×25) → logits N×1; the raw image is resized to R with
    antialiased bilinear interpolation (EG3D's 'antialiased' filtered resizing).
    """

    def forward(self, image: torch.Tensor, image_raw: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        raw = F.interpolate(image_raw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self._run(torch.cat([image, raw], dim=1), c)
