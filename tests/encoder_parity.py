"""Deterministic weights and inputs for the encoder parity fixture (`encoder_parity.pt`).

The fixture holds outputs of the ORIGINAL code (3dpe `EG3DInvEncoder` LT/Normal and `Live3DEditingEncoder`,
smp 0.3.3 + timm, eval mode, no_grad, torch 2.14 CPU fp32) for the weights and inputs built here. Weights
come from a closed-form hash of (tensor index, element index) in float64 numpy, so any machine rebuilds them
without storing 170M numbers (identically up to the odd float32 rounding step where libm's `sin` differs in
its last bit, far below the parity bounds). Non-default values everywhere, including `pos_embed`.

The fixture is not shipped (it was produced by running the original code): the tests get it through the
`encoder_parity_outputs` fixture of tests/conftest.py, which reads `$THREEDPE_ENCODER_PARITY`, else
`<reference>/fixtures/encoder_parity.pt`, and skips when absent (fails under CI=true).
"""
from __future__ import annotations

import math

import numpy as np
import torch

IMAGE_SIZE = 64       # encoder input side (any multiple of 16 runs; small keeps the test fast)
REFERENCE_SIZE = 512  # reference image side for the MAE preprocessing (downsampled to 224)


def _uniform(n: int, salt: int) -> np.ndarray:
    """n pseudo-random numbers in (-1, 1), a fixed function of (salt, index)."""
    i = np.arange(n, dtype=np.float64)
    v = np.sin(i * 12.9898 + salt * 78.233 + 0.5) * 43758.5453
    return 2.0 * (v - np.floor(v)) - 1.0


def hashed_state_dict(keys_shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """A state dict of the listed keys/shapes: weights uniform with variance 1/fan_in, LayerNorm weights
    1 ± 0.1, biases ± 0.1, class token / position table ± 0.5."""
    out = {}
    for idx, (key, shape) in enumerate(keys_shapes):
        n = math.prod(shape)
        u = _uniform(n, idx + 1)
        if key.endswith(("pos_embed", "cls_token")):
            v = 0.5 * u
        elif len(shape) >= 2:
            v = u * math.sqrt(3.0 / (n // shape[0]))
        elif "norm" in key and key.endswith(".weight"):
            v = 1.0 + 0.1 * u
        else:
            v = 0.1 * u
        out[key] = torch.from_numpy(v.astype(np.float32)).reshape(shape)
    return out


def pattern_image(n: int, size: int, phase: float = 0.0) -> torch.Tensor:
    """A deterministic N×3×size×size image in [-1,1] with fine and coarse structure."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    imgs = []
    for b in range(n):
        chans = [np.sin(0.37 * xx * (c + 1) + 0.23 * yy + phase + b) * np.cos(0.11 * yy * (c + 2) - 0.05 * xx)
                 for c in range(3)]
        imgs.append(np.stack(chans))
    return torch.from_numpy(np.stack(imgs).astype(np.float32))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())
