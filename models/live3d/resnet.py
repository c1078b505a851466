"""ResNet-34 trunk without BatchNorm: the E_low backbone of the Live3D encoder.

The original built smp's DeepLabV3 ResNet-34 encoder (output stride 8, depth 3) and replaced every
BatchNorm with Identity, giving every conv a bias. State-dict keys: `conv1`, `layer{1..4}.{i}.conv{1,2}`,
`layer{2,3,4}.0.downsample.0`; no `fc`. Only conv1 (+ReLU), maxpool + layer1 and layer2 run; layer3/4 are
kept (dilated 2 and 4, stride 1, as output stride 8 makes them) so original checkpoints load strictly.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

RESNET34_BLOCKS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """conv3×3 → ReLU → conv3×3, plus the (optionally 1×1-conv projected) input, → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        project = stride != 1 or in_ch != out_ch
        if dilation > 1:  # dilated stage of an output-stride-8 encoder: its stride became a dilation
            stride = 1
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=dilation, dilation=dilation)
        self.downsample: nn.Module | None = None
        if project:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x N×in×H×W → N×out×H/stride×W/stride."""
        out = self.conv2(F.relu(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _make_layer(in_ch: int, out_ch: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride, dilation)]
    layers += [BasicBlock(out_ch, out_ch, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetNoBN(nn.Module):
    """ResNet-34 (by default) without BatchNorm, run to `depth` 3.

    widths: channels of layer1..4 (conv1 has widths[0]); blocks: blocks per layer.
    """

    def __init__(self, in_channels: int = 5, widths: Sequence[int] = RESNET34_WIDTHS,
                 blocks: Sequence[int] = RESNET34_BLOCKS):
        super().__init__()
        w = list(widths)
        self.out_channels = w[1]
        self.conv1 = nn.Conv2d(in_channels, w[0], kernel_size=7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_layer(w[0], w[0], blocks[0], stride=1, dilation=1)
        self.layer2 = _make_layer(w[0], w[1], blocks[1], stride=2, dilation=1)
        # Never executed (depth 3); present for checkpoint compatibility.
        self.layer3 = _make_layer(w[1], w[2], blocks[2], stride=2, dilation=2)
        self.layer4 = _make_layer(w[2], w[3], blocks[3], stride=2, dilation=4)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x N×5×H×W → layer2 features N×widths[1]×H/8×W/8 (128×64×64 for a 512 input)."""
        x = F.relu(self.conv1(x))
        x = self.layer1(self.maxpool(x))
        return self.layer2(x)
