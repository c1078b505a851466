"""The Live3D (LP3D) image → triplane encoder, modes 'LT' and 'Normal'.

    image N×3×H×W in [-1,1] ──(+ row/column index channels)──► x5 N×5×H×W
    E_low:  encoder (ResNet-34, no BN) → decoder (ASPP) → F_encoder (patch embed + blocks) → f
    E_high: EHigh_encoder (plain convs) → high
    fusion: Final_encoder(high, f) → triplane N×96×H/2×W/2

State-dict keys, shapes and order equal the original checkpoints' `encoder_state_dict` (LT: 170 entries,
Normal: 210; the `Final_encoder.pathembed` spelling is the original's). Widths are config fields (the
defaults are the original's) so `Live3DConfig.tiny(mode)` builds a fast model with the same key names.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.live3d.aspp import DeepLabV3Decoder
from models.live3d.mix_transformer import Block, OverlapPatchEmbed, segformer_init_, tokens_to_map
from models.live3d.resnet import RESNET34_BLOCKS, RESNET34_WIDTHS, ResNetNoBN
from utils.config import check_choices
from utils.errors import ConfigError

Live3DMode = Literal["LT", "Normal"]
MODES: tuple[str, ...] = typing.get_args(Live3DMode)
TRIPLANE_CHANNELS = 96  # 3 planes × 32 features


@dataclass
class Live3DConfig:
    """Architecture of the Live3D encoder (defaults = the original's).

    mode: 'LT' (the one 3DPE builds on) or 'Normal'.
    resnet_widths / resnet_blocks: ResNet-34 stage widths and depths (layer2's width feeds the ASPP).
    aspp_channels / aspp_rates: DeepLabV3 head width and dilations.
    vit_dim: token width of both patch embeddings (a multiple of 4: PixelShuffle(2) follows).
    f_depth: number of F_encoder blocks (None: 2 for LT, 5 for Normal).
    f_heads / final_heads, mlp_ratio, final_sr_ratio: the mix-transformer blocks' settings.
    feat_channels: width of f and E_high's output (None: 128 for LT, 96 for Normal).
    high_stem: width of E_high's first (7×7, stride 2) conv.
    mid_channels / narrow_channels: the fusion convs' widths (256 / 128 in the original).
    input_resolution: image side the released weights expect (the model runs at any multiple of 16).
    """

    mode: Live3DMode = "LT"
    resnet_widths: tuple[int, ...] = RESNET34_WIDTHS
    resnet_blocks: tuple[int, ...] = RESNET34_BLOCKS
    aspp_channels: int = 256
    aspp_rates: tuple[int, ...] = (12, 24, 36)
    vit_dim: int = 1024
    f_depth: int | None = None
    f_heads: int = 4
    final_heads: int = 2
    mlp_ratio: float = 2.0
    final_sr_ratio: int = 2
    feat_channels: int | None = None
    high_stem: int = 64
    mid_channels: int = 256
    narrow_channels: int = 128
    input_resolution: int = 512

    def __post_init__(self) -> None:
        check_choices(self)
        if self.vit_dim % 4:
            raise ConfigError(f"Live3DConfig.vit_dim must be a multiple of 4, got {self.vit_dim}")

    @property
    def depth(self) -> int:
        """Number of F_encoder blocks."""
        return self.f_depth if self.f_depth is not None else (2 if self.mode == "LT" else 5)

    @property
    def feat(self) -> int:
        """Width of f and of E_high's output."""
        return self.feat_channels if self.feat_channels is not None else (128 if self.mode == "LT" else 96)

    @classmethod
    def tiny(cls, mode: str = "LT") -> "Live3DConfig":
        """Same key names and depths, small widths (tests run a forward in well under a second at 64²)."""
        return cls(mode=mode, resnet_widths=(8, 16, 16, 16), aspp_channels=16, vit_dim=32, f_heads=2,
                   final_heads=2, feat_channels=16, high_stem=8, mid_channels=16, narrow_channels=16)


def append_coordinates(image: torch.Tensor) -> torch.Tensor:
    """N×3×H×W → N×5×H×W: channel 3 is the row index 0..H-1, channel 4 the column index 0..W-1 (raw)."""
    n, _, h, w = image.shape
    rows = torch.arange(h, device=image.device, dtype=image.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
    cols = torch.arange(w, device=image.device, dtype=image.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([image, rows, cols], dim=1)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(negative_slope=0.01)


def _up2() -> nn.Upsample:
    # nn.UpsamplingBilinear2d in the original: bilinear with align_corners=True.
    return nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=True)


class EncoderF(nn.Module):
    """E_low's transformer part: ASPP features N×aspp×h×w → f N×feat×2h×2w (LT) or N×feat×4h×4w (Normal)."""

    def __init__(self, cfg: Live3DConfig):
        super().__init__()
        d = cfg.vit_dim
        self.patchembed = OverlapPatchEmbed(patch_size=7, stride=2, in_chans=cfg.aspp_channels, embed_dim=d)
        self.blocks = nn.ModuleList([Block(d, cfg.f_heads, cfg.mlp_ratio, sr_ratio=1) for _ in range(cfg.depth)])
        self.upsample = nn.Sequential(nn.PixelShuffle(2), _up2())
        c, nc, feat = d // 4, cfg.narrow_channels, cfg.feat
        if cfg.mode == "Normal":
            self.net = nn.Sequential(_conv(c, nc), nn.ReLU(), _up2(), _conv(nc, nc), nn.ReLU(), _conv(nc, feat))
        else:
            self.net = nn.Sequential(_conv(c, nc), _lrelu(), _conv(nc, feat))
        self.net.apply(segformer_init_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.patchembed(x)
        for blk in self.blocks:
            x = blk(x, h, w)
        return self.net(self.upsample(tokens_to_map(x, h, w)))


class EncoderEhigh(nn.Module):
    """E_high: plain convs on x5 N×5×H×W → N×feat×H/4×W/4 (LT) or N×feat×H/2×W/2 (Normal)."""

    def __init__(self, cfg: Live3DConfig):
        super().__init__()
        feat, stem = cfg.feat, cfg.high_stem
        if cfg.mode == "Normal":
            layers: list[nn.Module] = [_conv(5, stem, 7, 2), _lrelu(), _conv(stem, feat), _lrelu()]
            for _ in range(3):
                layers += [_conv(feat, feat), _lrelu()]
        else:
            layers = [_conv(5, stem, 7, 2), _lrelu(), _conv(stem, feat, 3, 2), _lrelu()]
            for i in range(5):
                layers += [_conv(feat, feat)] + ([_lrelu()] if i < 4 else [])
        self.net = nn.Sequential(*layers)
        self.net.apply(segformer_init_)

    def forward(self, x5: torch.Tensor) -> torch.Tensor:
        return self.net(x5)


class EncoderFinal(nn.Module):
    """Fusion E(high, f) → triplane N×96×H/2×W/2 (H: the image side)."""

    def __init__(self, cfg: Live3DConfig):
        super().__init__()
        self.mode = cfg.mode
        feat, mid, nc, d = cfg.feat, cfg.mid_channels, cfg.narrow_channels, cfg.vit_dim
        if cfg.mode == "Normal":
            self.net = nn.Sequential(_conv(2 * feat, mid), _lrelu(), _conv(mid, nc), _lrelu())
            embed_in = nc
        else:
            self.net = nn.Sequential(_conv(2 * feat, mid))
            embed_in = mid
        self.pathembed = OverlapPatchEmbed(patch_size=7, stride=2, in_chans=embed_in, embed_dim=d)
        self.block = Block(d, cfg.final_heads, cfg.mlp_ratio, sr_ratio=cfg.final_sr_ratio)
        self.pixelShuffel = nn.PixelShuffle(2)
        t = TRIPLANE_CHANNELS
        if cfg.mode == "Normal":
            self.output_net = nn.Sequential(
                _conv(d // 4 + feat, mid), _lrelu(), _conv(mid, nc), _lrelu(), _conv(nc, nc), _lrelu(),
                _conv(nc, t))
        else:
            self.output_net = nn.Sequential(
                _conv(d // 4, mid), _lrelu(), _up2(), _conv(mid, nc), _lrelu(), _conv(nc, nc), _lrelu(),
                _conv(nc, t), _lrelu(), _conv(t, t))
        self.net.apply(segformer_init_)
        self.output_net.apply(segformer_init_)

    def forward(self, high: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """high, f: N×feat×h×w each → N×96×(2h)×(2w) (LT) or N×96×h×w (Normal)."""
        x, h, w = self.pathembed(self.net(torch.cat([high, f], dim=1)))
        x = self.pixelShuffel(tokens_to_map(self.block(x, h, w), h, w))
        if self.mode == "Normal":
            x = torch.cat([x, f], dim=1)
        return self.output_net(x)


class Live3DTrunk(nn.Module):
    """The five Live3D submodules, in the original order, and the shared forward pieces.

    Subclassed by `Live3DEncoder` (reconstruction) and `EditingEncoder` (which adds `Ref_encoder`).
    """

    def __init__(self, cfg: Live3DConfig):
        super().__init__()
        self.live3d_config = cfg
        self.encoder = ResNetNoBN(5, cfg.resnet_widths, cfg.resnet_blocks)
        self.decoder = DeepLabV3Decoder(self.encoder.out_channels, cfg.aspp_channels, cfg.aspp_rates)
        self.F_encoder = EncoderF(cfg)
        self.EHigh_encoder = EncoderEhigh(cfg)
        self.Final_encoder = EncoderFinal(cfg)

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image N×3×H×W in [-1,1] (or N×5×H×W with coordinates) → (x5 N×5×H×W, f, high).

        LT: f and high are N×128×H/4×W/4; Normal: N×96×H/2×W/2.
        """
        if image.shape[1] == 3:
            x5 = append_coordinates(image)
        elif image.shape[1] == 5:
            x5 = image
        else:
            raise ValueError(f"expected an N×3×H×W image (or N×5×H×W with coordinates), got {tuple(image.shape)}")
        f = self.F_encoder(self.decoder(self.encoder(x5)))
        high = self.EHigh_encoder(x5)
        return x5, f, high


class Live3DEncoder(Live3DTrunk):
    """Live3D reconstruction encoder: image N×3×H×W in [-1,1] → triplane N×96×H/2×W/2."""

    def __init__(self, cfg: Live3DConfig | None = None):
        super().__init__(cfg or Live3DConfig())
        self.config = self.live3d_config

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image N×3×H×W in [-1,1], H and W multiples of 16 (512 for released weights) → N×96×H/2×W/2."""
        _, f, high = self.features(image)
        return self.Final_encoder(high, f)
