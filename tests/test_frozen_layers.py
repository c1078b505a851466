"""Constant-weight convolutions and leaky ReLUs under input gradients (models/eg3d/ops.py, issue #15): the same
values and input gradients as autograd (also through R1's double backward), with far less kept for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.eg3d.ops import frozen_conv2d, leaky_relu_compact_


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _assert_same(out: torch.Tensor, ref: torch.Tensor, x_out: torch.Tensor, x_ref: torch.Tensor) -> None:
    """Equal outputs, and equal input gradients under the same random output gradient."""
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(x_out.grad, x_ref.grad)


@pytest.mark.parametrize("transposed,stride,groups", [(False, 1, 1), (False, 2, 1), (False, 1, 8), (True, 2, 1)])
def test_frozen_conv_matches_autograd_and_keeps_no_input(transposed, stride, groups):
    torch.manual_seed(0)
    x0 = torch.randn(2, 8, 24, 24)
    w = torch.randn(8, 8 // groups, 3, 3)
    b = torch.randn(8)
    conv = F.conv_transpose2d if transposed else F.conv2d
    x1, x2 = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    ref = conv(x1, w, b, stride=stride, padding=1, groups=groups)
    out = frozen_conv2d(x2, w, b, stride=stride, padding=1, groups=groups, transposed=transposed)
    _assert_same(out, ref, x2, x1)
    x3 = x0.clone().requires_grad_(True)
    assert _saved_bytes(lambda: frozen_conv2d(x3, w, b, stride=stride, padding=1, groups=groups,
                                              transposed=transposed)) == 0


def test_frozen_conv_in_a_double_backward():
    """R1 differentiates the input gradient again: a frozen FIR inside a trainable chain gives the same grads."""
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 16, 16)
    fir = torch.randn(8, 1, 4, 4)
    grads = []
    for frozen in (False, True):
        w1 = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        w2 = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        h = F.conv2d(x, w1, padding=1)
        h = frozen_conv2d(h, fir, padding=1, groups=8) if frozen else F.conv2d(h, fir, padding=1, groups=8)
        out = F.conv2d(F.leaky_relu(h, 0.2), w2, stride=2).sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        g.square().sum().backward()
        grads.append((w1.grad, w2.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("clamp", [None, 0.5])
def test_compact_leaky_relu_matches_autograd(clamp):
    torch.manual_seed(0)
    x0 = torch.randn(2, 8, 32, 32)
    x0[0, 0, 0, :4] = torch.tensor([0.0, 0.5, -2.5, 2.5])  # zero, the clamp bounds (no gradient there)
    a, b = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    ref = F.leaky_relu(a * 1, 0.2)
    ref = ref if clamp is None else ref.clamp(-clamp, clamp)
    out = leaky_relu_compact_(b * 1, 0.2, clamp)
    _assert_same(out, ref, b, a)
    c = x0.clone().requires_grad_(True)
    kept = _saved_bytes(lambda: leaky_relu_compact_(c * 1, 0.2, clamp))
    assert kept <= x0.numel() * (2 if clamp is not None else 1)  # a byte per element (and one for the clamp)
