"""Mix-transformer (SegFormer-style) layers used by the Live3D encoder and the editing fuser.

Parameter names, shapes and numerics follow the layers the original code took from
segmentation-models-pytorch 0.3.x: LayerNorm eps 1e-5, exact (erf) GELU, no bias on `q`/`kv`, attention
scale 1/sqrt(head_dim), a 3×3 depth-wise conv between `fc1` and the GELU. Dropout and drop-path rates are
zero there, so no dropout layers are kept.

Tokens are laid out N×(H·W)×C, row-major over the H×W grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def segformer_init_(m: nn.Module) -> None:
    """The original's initialisation (apply with `module.apply`): Linear trunc-normal std 0.02 and zero bias,
    LayerNorm 1/0, Conv2d normal(0, sqrt(2/fan_out)) with fan_out = k·k·out/groups and zero bias."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class OverlapPatchEmbed(nn.Module):
    """Strided conv "patch embedding" with overlapping windows, then LayerNorm over channels.

    `proj`: Conv2d(in_chans → embed_dim, kernel patch_size, stride, padding patch_size//2); `norm`: LayerNorm.
    """

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768,
                 eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.apply(segformer_init_)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """x N×C_in×H_in×W_in → (tokens N×(H·W)×embed_dim, H, W) with H = ceil(H_in/stride) for odd kernels."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, int(h), int(w)


class Attention(nn.Module):
    """Multi-head self-attention with optional spatial reduction of keys/values.

    `q` (no bias), `kv` (no bias, dim → 2·dim), `proj`; for sr_ratio > 1 the keys/values come from
    `sr` (Conv2d kernel = stride = sr_ratio) followed by `norm` (LayerNorm).
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, qkv_bias: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x N×(h·w)×dim → N×(h·w)×dim."""
        n, length, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(n, length, heads, hd).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = x.transpose(1, 2).reshape(n, c, h, w)
            src = self.norm(self.sr(src).flatten(2).transpose(1, 2))
        kv = self.kv(src).reshape(n, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        # SDPA's default scale is 1/sqrt(head_dim), the original's qk scale.
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class DWConv(nn.Module):
    """3×3 depth-wise conv over the token grid; key `dwconv`."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x N×(h·w)×dim → N×(h·w)×dim."""
        n, _, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(n, c, h, w))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 → depth-wise conv → GELU (exact) → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x N×(h·w)×dim → N×(h·w)×dim."""
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, sr_ratio: int = 1,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads=num_heads, sr_ratio=sr_ratio, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.apply(segformer_init_)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x N×(h·w)×dim → N×(h·w)×dim."""
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens N×(h·w)×C → feature map N×C×h×w."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
