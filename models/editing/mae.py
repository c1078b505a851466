"""MAE ViT-B/16 image tower: the released 3DPE prompt encoder (a reference image → 197×768 tokens).

Keys equal the official MAE encoder's (and the `Ref_encoder.mae_encoder.*` part of 3dpe.pt): `cls_token`,
`pos_embed` (a stored, frozen Parameter: used exactly as loaded, initialised to the fixed 2-D sin-cos table),
`patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`.
Blocks are pre-norm ViT blocks: LayerNorm eps 1e-6, qkv with bias, exact GELU, no layer scale; the forward
runs without masking and returns every token after the final norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint.hub import resolve_weights
from utils.errors import MissingWeightsError, UnknownCheckpointFormatError

MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
DEFAULT_MAE_WEIGHTS = "pretrained_models/mae_pretrain_vit_base.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MAEViTConfig:
    """ViT encoder shape (defaults: MAE ViT-B/16 at 224)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @classmethod
    def tiny(cls, embed_dim: int = 32) -> "MAEViTConfig":
        """32² input, 8² patches (17 tokens), 2 blocks: for tests."""
        return cls(img_size=32, patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2)

    @property
    def num_tokens(self) -> int:
        """1 + (img_size/patch_size)²: 197 for ViT-B/16 at 224."""
        return 1 + (self.img_size // self.patch_size) ** 2


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (1+grid²)×dim (a zero row first for the class token).

    First half of the channels encodes the column (x), second half the row (y), as MAE's table does
    (its meshgrid puts w first); each half is
    [sin(p·ω), cos(p·ω)] with ω_k = 1/10000^(k/(dim/4)), computed in float32 like MAE's numpy version.
    """
    if dim % 4:
        raise ValueError(f"pos-embed dim must be a multiple of 4, got {dim}")
    omega = torch.arange(dim // 4, dtype=torch.float32) / (dim / 4.0)
    omega = 1.0 / 10000 ** omega
    coords = torch.arange(grid, dtype=torch.float32)
    ys = coords.repeat_interleave(grid)  # row index of each patch, row-major
    xs = coords.repeat(grid)

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    table = torch.cat([one_d(xs), one_d(ys)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused `qkv` (bias) and `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x N×T×C → N×T×C."""
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class ViTMlp(nn.Module):
    """fc1 → GELU (exact) → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ViTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: `proj` Conv2d(kernel = stride = patch) → tokens N×(grid²)×C."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MAEViT(nn.Module):
    """MAE ViT encoder without masking: N×3×img×img (ImageNet-normalised) → tokens N×(1+grid²)×C."""

    def __init__(self, cfg: MAEViTConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or MAEViTConfig()
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Frozen but stored: checkpoints may hold other values than the sin-cos table, and those are used.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.embed_dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            [ViTBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)
        # On the module's device, so preprocessing copies nothing from the host; in the module's dtype (`.double()`
        # makes them float64 with the rest).
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: patch conv and Linear layers xavier-uniform (conv as a flattened Linear),
        # zero biases, class token normal(0.02), LayerNorm 1/0.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x N×3×img×img, ImageNet-normalised → N×(1+grid²)×C (197×768 for ViT-B/16), after the final norm."""
        size = self.config.img_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"MAEViT expects {size}×{size} inputs, got {tuple(x.shape[-2:])}; "
                             "use encode_image for arbitrary [-1,1] images")
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def preprocess(self, reference: torch.Tensor) -> torch.Tensor:
        """The original's reference preprocessing: [-1,1] → [0,1], bicubic resize to img_size×img_size
        WITHOUT antialiasing and without clamping (torchvision 0.14's tensor `Resize` on float input),
        ImageNet normalisation. N×3×H×W → N×3×img×img."""
        x = (reference + 1.0) / 2.0
        size = self.config.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
        return (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)

    def encode_image(self, reference: torch.Tensor) -> torch.Tensor:
        """reference N×3×H×W in [-1,1] (square; 512² in the original) → tokens N×(1+grid²)×C."""
        return self(self.preprocess(reference))

    def load_official_mae(self, path: str | Path = DEFAULT_MAE_WEIGHTS) -> None:
        """Load the official MAE pretrain checkpoint (`mae_pretrain_vit_base.pth`) into this encoder."""
        self.load_state_dict(read_official_mae(path), strict=True)


def read_official_mae(path: str | Path = DEFAULT_MAE_WEIGHTS) -> dict[str, torch.Tensor]:
    """The encoder tensors of an official MAE checkpoint (its `model` dict; decoder/mask keys dropped).

    Raises MissingWeightsError when the file is absent, UnknownCheckpointFormatError when it holds no
    MAE encoder.
    """
    p = resolve_weights(path, files=(Path(DEFAULT_MAE_WEIGHTS).name,))  # a Hub id → its cached file
    if not p.is_file():
        raise MissingWeightsError(str(p), "MAE ViT-B/16 pretrain weights", MAE_URL)
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        raise UnknownCheckpointFormatError(
            f"'{p}' is not an MAE checkpoint (expected a 'model' dict with 'patch_embed.proj.weight'); "
            f"get {MAE_URL}")
    skip = ("decoder", "mask_token")
    return {k: v for k, v in sd.items() if not k.startswith(skip)}


def load_official_mae(path: str | Path = DEFAULT_MAE_WEIGHTS, model: MAEViT | None = None) -> MAEViT:
    """Load `mae_pretrain_vit_base.pth` into `model` (a new ViT-B/16 when None), strict on encoder keys."""
    model = model if model is not None else MAEViT(MAEViTConfig())
    model.load_official_mae(path)
    return model
