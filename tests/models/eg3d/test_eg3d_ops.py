"""models/eg3d/ops.py against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.eg3d.ops import bias_act, conv2d_resample, downsample2d, setup_filter, upfirdn2d, upsample2d
from rounding import assert_within, gamma32


def _naive_upfirdn2d(x: np.ndarray, f: np.ndarray, up: int, down: int, pad: tuple[int, int, int, int], gain: float):
    """Zero insertion, zero padding (non-negative pads), true 2-D convolution, decimation — loops, float64."""
    n, c, h, w = x.shape
    u = np.zeros((n, c, h * up, w * up))
    u[:, :, ::up, ::up] = x
    px0, px1, py0, py1 = pad
    u = np.pad(u, ((0, 0), (0, 0), (py0, py1), (px0, px1)))
    f = f * gain ** (f.ndim / 2)
    fh, fw = f.shape
    oh, ow = u.shape[2] - fh + 1, u.shape[3] - fw + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            # convolution: flipped filter
            out[:, :, i, j] = (u[:, :, i:i + fh, j:j + fw] * f[::-1, ::-1]).sum(axis=(2, 3))
    return out[:, :, ::down, ::down]


def test_bias_act_linear_and_lrelu():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4)
    b = torch.randn(5)
    assert torch.allclose(bias_act(x, b), x + b.view(1, 5, 1, 1))
    # Against the formula in float64: x + b, α (cast to float32), α·z, the gain (cast), gain·(...) are ≤ 5 float32
    # roundings, ≤ γ_5 relative on any CPU (the clamp is exact; z's sign, the kink, is exact). Measured ≤ 0.38 of it.
    z = x.double() + b.double().view(1, 5, 1, 1)
    want = torch.where(z >= 0, z, 0.2 * z) * math.sqrt(2)
    assert_within(bias_act(x, b, act="lrelu"), want, gamma32(5) * want.abs(), "lrelu")
    want = (torch.where(z >= 0, z, 0.1 * z) * 3.0).clamp(-0.5, 0.5)
    assert_within(bias_act(x, b, act="lrelu", alpha=0.1, gain=3.0, clamp=0.5), want, gamma32(5) * want.abs(),
                  "lrelu, clamp")
    # bias along the last dim (fully connected layers)
    x2 = torch.randn(4, 7)
    b2 = torch.randn(7)
    want = F.relu(x2.double() + b2.double()) * math.sqrt(2)
    assert_within(bias_act(x2, b2, dim=1, act="relu"), want, gamma32(5) * want.abs(), "relu")


def test_bias_act_errors():
    with pytest.raises(ValueError):
        bias_act(torch.zeros(1, 2), act="nope")
    with pytest.raises(ValueError):
        bias_act(torch.zeros(1, 2, 3, 3), torch.zeros(3))


def test_setup_filter_default():
    f = setup_filter([1, 3, 3, 1])
    expected = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
    assert f.shape == (4, 4) and torch.allclose(f, expected)
    assert abs(f.sum().item() - 1) < 1e-6


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2, 2, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (2, 2, (1, 2, 1, 2))])
def test_upfirdn2d_matches_naive(up, down, pad):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 5, generator=g)
    f = torch.rand(4, 3, generator=g) + 0.1  # non-square, non-symmetric: catches flips and axis swaps
    out = upfirdn2d(x, f, up=up, down=down, padding=list(pad), gain=1.7)
    ref = _naive_upfirdn2d(x.double().numpy(), f.double().numpy(), up, down, pad, 1.7)
    assert out.shape == ref.shape
    # float32 vs the float64 loops: ≤ 12 products summed, after 2 roundings of each tap (the gain's cast, f·gain):
    # ≤ γ_14 · Σ|x·f·gain| (tests/rounding.py). Measured ≤ 0.16 of that bound (1.0e-6 absolute).
    bound = gamma32(f.numel() + 2) * _naive_upfirdn2d(x.double().abs().numpy(), f.double().numpy(), up, down, pad, 1.7)
    assert_within(out, torch.from_numpy(ref), torch.from_numpy(bound), f"upfirdn2d up={up} down={down}")


def test_upfirdn2d_negative_padding_crops():
    x = torch.randn(1, 2, 8, 8)
    out = upfirdn2d(x, None, padding=[-1, -2, -3, 0])
    assert torch.equal(out, x[:, :, 3:, 1:6])


def test_upsample_downsample_shapes_and_dc_gain():
    f = setup_filter([1, 3, 3, 1])
    x = torch.ones(1, 3, 8, 8)
    up = upsample2d(x, f)
    assert up.shape == (1, 3, 16, 16)
    # exact on any CPU: the taps (1, 3, 3, 1)⊗(1, 3, 3, 1)/64 × gain 4 are dyadic, their sums need < 24 bits
    assert torch.allclose(up[:, :, 2:-2, 2:-2], torch.ones(1, 3, 12, 12), rtol=0, atol=1e-6)  # measured 0
    down = downsample2d(x, f)
    assert down.shape == (1, 3, 4, 4)
    assert torch.allclose(down[:, :, 1:-1, 1:-1], torch.ones(1, 3, 2, 2), rtol=0, atol=1e-6)  # measured 0


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_resample_up_equals_generic(groups):
    """The transposed-conv fast path equals 'FIR-upsample with gain 4, then plain conv' (the generic path)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 6, generator=g)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g)
    f = setup_filter([1, 3, 3, 1]) * (1 + 0.2 * (torch.rand(4, 4, generator=g) - 0.5))
    f = f / f.sum()
    out = conv2d_resample(x, w, f=f, up=2, padding=1, groups=groups, flip_weight=False)
    # generic: padding 1 + (fw+up-1)//2 = 3 before, 1 + (fw-up)//2 = 2 after; flip_weight=False → true convolution

    def generic(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return F.conv2d(upfirdn2d(x, f, up=2, padding=[3, 2, 3, 2], gain=4), w.flip([2, 3]), groups=groups)

    ref = generic(x, w, f)
    assert out.shape == (2, 6, 10, 12)
    # Both float32 paths against the generic path in float64: each sums the same products x·f·w (4·4 FIR taps, ≤ 36
    # kernel taps, the gain 4 is exact) in its own order, ≤ γ_53 · Σ|x·f·w| on any CPU (tests/rounding.py).
    # Measured ≤ 0.035 of that bound (1.7e-6 absolute at |out| ≤ 9.5).
    ref64 = generic(x.double(), w.double(), f.double())
    bound = gamma32(16 + 36 + 1) * generic(x.double().abs(), w.double().abs(), f.double().abs())
    assert_within(out, ref64, bound, "transposed-conv path")
    assert_within(ref, ref64, bound, "generic path")


def test_conv2d_resample_plain_and_1x1_down():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 8, 8, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    # bit-exact by construction: the same F.conv2d call (and for the 1×1 kernel, the same upfirdn2d call first)
    assert torch.equal(conv2d_resample(x, w, padding=1), F.conv2d(x, w, padding=1))
    w1 = torch.randn(5, 3, 1, 1, generator=g)
    f = setup_filter([1, 3, 3, 1])
    out = conv2d_resample(x, w1, f=f, down=2)
    assert torch.equal(out, F.conv2d(downsample2d(x, f), w1))
    with pytest.raises(ValueError):
        conv2d_resample(x, w, up=2)
