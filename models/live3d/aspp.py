"""DeepLabV3 decoder (ASPP head) without BatchNorm, as the Live3D encoder uses it.

Keys (inside the encoder's `decoder`): `0.convs.0.0` (1×1), `0.convs.{1,2,3}.0` (3×3, dilations 12/24/36),
`0.convs.4.1` (image-pooling branch), `0.project.0` (1×1 over the 5 concatenated branches), `1` (3×3).
Each conv is followed by a ReLU where the original had BN+ReLU; the projection ends with Dropout(0.5),
which is active only in train mode. The indices of the removed BN layers are kept as Identity so the
state-dict keys match.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _PoolingBranch(nn.Sequential):
    """Global average pool → 1×1 conv → ReLU, broadcast back (bilinear, align_corners=False) to H×W."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1), nn.Identity(), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: `convs` (5 branches) → concat → `project` (1×1, ReLU, Dropout 0.5)."""

    def __init__(self, in_ch: int, out_ch: int = 256, rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.Identity(), nn.ReLU())]
        for r in rates:
            branches.append(nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=r, dilation=r),
                                          nn.Identity(), nn.ReLU()))
        branches.append(_PoolingBranch(in_ch, out_ch))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_ch, out_ch, 1), nn.Identity(), nn.ReLU(),
                                     nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x N×in×H×W → N×out×H×W."""
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3Decoder(nn.Sequential):
    """ASPP → 3×3 conv → ReLU: N×in×H×W → N×out×H×W (256×64×64 for the 512 Live3D input)."""

    def __init__(self, in_ch: int, out_ch: int = 256, rates: Sequence[int] = (12, 24, 36)):
        super().__init__(ASPP(in_ch, out_ch, rates), nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.Identity(),
                         nn.ReLU())
        self.out_channels = out_ch
