"""Cross-attention fuser (the original `Ref_encoder`): injects prompt tokens into Live3D's E_high features.

    high N×128×128² ─pre_conv 3×3→96─► patch_emb (7×7, stride 4, →768) + LayerNorm ─► queries N×32²×768
    queries × prompt tokens N×T×768 ─ single-head, parameter-free attention (scale 1/√768) ─► N×32²×768
    ─► N×768×32² ─PixelShuffle(2)─► 192×64² ─proj_tail 1×1→512 (no bias)─► PixelShuffle(2) ─► N×128×128²

The output replaces E_high (the original's `residual=False`). The fuser owns the prompt encoder as a child
named `mae_encoder` (MAE) or `clip_encoder` (CLIP), registered first so the state-dict order is the
original's: `<prompt>.*`, `pre_conv.*`, `patch_emb.*`, `proj_tail.*`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.live3d.mix_transformer import OverlapPatchEmbed, tokens_to_map


class CrossAttentionFuser(nn.Module):
    """Attention of E_high patches over prompt tokens.

    prompt_encoder: the module producing the tokens (owned here only for the state-dict layout; the fuser's
        forward takes tokens, so a prompt is encoded once and reused); None for a bare fuser.
    prompt_name: its attribute name ('mae_encoder' or 'clip_encoder').
    in_channels: E_high width (128); pre_channels: pre_conv width (96); token_dim: attention width (768,
        a multiple of 4; in_channels·4 channels come out of proj_tail).
    """

    def __init__(self, prompt_encoder: nn.Module | None = None, prompt_name: str = "mae_encoder",
                 in_channels: int = 128, pre_channels: int = 96, token_dim: int = 768):
        super().__init__()
        if token_dim % 4:
            raise ValueError(f"token_dim must be a multiple of 4, got {token_dim}")
        self.prompt_name = prompt_name
        self.token_dim = token_dim
        if prompt_encoder is not None:
            self.add_module(prompt_name, prompt_encoder)
        self.pre_conv = nn.Conv2d(in_channels, pre_channels, kernel_size=3, stride=1, padding=1)
        self.patch_emb = OverlapPatchEmbed(patch_size=7, stride=4, in_chans=pre_channels, embed_dim=token_dim)
        self.proj_tail = nn.Conv2d(token_dim // 4, in_channels * 4, kernel_size=1, bias=False)
        self.shuffle = nn.PixelShuffle(2)

    @property
    def prompt_encoder(self) -> nn.Module | None:
        """The owned prompt encoder (or None)."""
        return self._modules.get(self.prompt_name)

    def forward(self, high: torch.Tensor, tokens: torch.Tensor,
                token_bias: torch.Tensor | None = None) -> torch.Tensor:
        """high N×C×h×w (E_high, 128×128×128), tokens N×T×token_dim or 1×T×token_dim (shared by the batch),
        token_bias None or N×T / 1×T float added to the attention logits (0 = keep, -inf = drop, log w = weight;
        a row of all -inf gives NaN) → N×C×h×w."""
        n = high.shape[0]
        q, h, w = self.patch_emb(self.pre_conv(high))
        tokens = tokens.to(q.dtype)
        if tokens.shape[0] != n:
            if tokens.shape[0] != 1:
                raise ValueError(f"tokens batch {tokens.shape[0]} does not match image batch {n}")
            tokens = tokens.expand(n, -1, -1)
        mask = None
        if token_bias is not None:
            if token_bias.shape[-1] != tokens.shape[1]:
                raise ValueError(f"token_bias has {token_bias.shape[-1]} entries for {tokens.shape[1]} tokens")
            mask = token_bias.to(q.dtype).reshape(-1, 1, tokens.shape[1]).expand(n, 1, -1)
        # Default SDPA scale is 1/sqrt(token_dim): the original's A = softmax(Q·Kᵀ/√768).
        out = F.scaled_dot_product_attention(q, tokens, tokens, attn_mask=mask)
        out = self.shuffle(tokens_to_map(out, h, w))
        return self.shuffle(self.proj_tail(out))
