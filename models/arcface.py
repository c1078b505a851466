"""ArcFace IR-SE50 face-recognition backbone (identity loss and identity metric).

Layout and key names follow the widely used `model_ir_se50.pth` (InsightFace_Pytorch IR-SE50, as in pSp/e4e and the
original 3DPE `criteria/id_loss.py`): `input_layer.*`, `body.<i>.{shortcut_layer,res_layer}.*`, `output_layer.*`.
The loader is best-effort: no key list of the released file was available, so a mismatch is reported, not guessed.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import MissingWeightsError

IR_SE50_URL = "https://github.com/TreB1eN/InsightFace_Pytorch (model_ir_se50.pth, also linked from the pSp/e4e READMEs)"


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class _BottleneckIRSE(nn.Module):
    def __init__(self, in_ch: int, depth: int, stride: int):
        super().__init__()
        if in_ch == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_ch, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            _SqueezeExcite(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """IR-SE50: 112×112 face crops (normalised to [-1,1]) → 512-d unit embeddings.

    `width` shrinks every stage for tests (64 = the real network).
    """

    def __init__(self, width: int = 64, units: tuple[int, ...] = (3, 4, 14, 3), drop_ratio: float = 0.6):
        super().__init__()
        chans = [width, width, width * 2, width * 4, width * 8]
        self.input_layer = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
        body = []
        for stage, n in enumerate(units):
            in_ch, depth = chans[stage], chans[stage + 1]
            body.append(_BottleneckIRSE(in_ch, depth, 2))
            body.extend(_BottleneckIRSE(depth, depth, 1) for _ in range(n - 1))
        self.body = nn.Sequential(*body)
        out = chans[-1]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(out), nn.Dropout(drop_ratio), nn.Flatten(), nn.Linear(out * 7 * 7, 512), nn.BatchNorm1d(512)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x N×3×112×112 in [-1,1] → N×512 L2-normalised embeddings."""
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


class IdentityEncoder(nn.Module):
    """Portrait (N×3×H×W in [-1,1], EG3D crop) → 512-d identity embedding, with the original's face crop.

    The image is resized to 256 (bilinear without antialiasing, as the original), cropped to rows 35:223 and
    columns 32:220, and pooled to 112×112.
    """

    def __init__(self, net: IRSE50):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "IdentityEncoder":
        super().train(mode)
        self.net.eval()  # BatchNorm statistics are frozen
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-1] != 256:
            x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
        x = F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))
        return self.net(x)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of identities, N (1 = same embedding)."""
        return (self(a) * self(b)).sum(dim=1)


def load_ir_se50(path: str | Path = "pretrained_models/model_ir_se50.pth") -> IdentityEncoder:
    """Load `model_ir_se50.pth` (a plain state dict) → IdentityEncoder; MissingWeightsError if absent."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(str(path), "ArcFace IR-SE50 weights (identity loss / metric)", IR_SE50_URL)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("facenet."): v for k, v in state.items()}
    net = IRSE50()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"{path}: not an IR-SE50 state dict ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    return IdentityEncoder(net)
