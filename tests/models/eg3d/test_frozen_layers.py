"""Constant-weight convolutions and leaky ReLUs under input gradients (models/eg3d/ops.py, issue #15): the same
values and input gradients as autograd (also through R1's double backward), with far less kept for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from models.eg3d import ops
from models.eg3d.ops import frozen_conv2d, leaky_relu_compact_
from rounding import assert_within, gamma32


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _conv_rounding(conv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **kw) -> tuple:
    """(`conv` in float64, the bound γ_{K+1}·(Σ|x·w| + |b|) on any float32 evaluation's error) for K = the kernel's
    taps per output channel: a sum of K products and the bias in any order (tests/rounding.py)."""
    ref64 = conv(x.double(), w.double(), None if b is None else b.double(), **kw)
    taps = w.shape[0] * w.shape[2] * w.shape[3] if conv is F.conv_transpose2d else w[0].numel()
    bound = conv(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), **kw)
    return ref64, gamma32(taps + 1) * bound


def _assert_same(out: torch.Tensor, ref: torch.Tensor, x_out: torch.Tensor, x_ref: torch.Tensor,
                 rounding: tuple | None = None) -> None:
    """Equal outputs, and equal input gradients under the same random output gradient (both are autograd's
    `convolution_backward` call). `rounding` (`_conv_rounding`): the outputs are two summation orders, each
    within its bound of the float64 value instead (measured ≤ 0.053 of it: 5.4e-6 absolute, where the former
    1e-5 tolerance between the two left a margin of 2)."""
    if rounding is None:
        assert torch.equal(out, ref)
    else:
        assert_within(out, *rounding, "ours")
        assert_within(ref, *rounding, "PyTorch's")
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
    by_phases = transposed and stride > 1  # see the test below
    rounding = _conv_rounding(conv, x0, w, b, stride=stride, padding=1, groups=groups) if by_phases else None
    _assert_same(out, ref, x2, x1, rounding)
    x3 = x0.clone().requires_grad_(True)
    assert _saved_bytes(lambda: frozen_conv2d(x3, w, b, stride=stride, padding=1, groups=groups,
                                              transposed=transposed)) == 0


@pytest.mark.parametrize("stride,padding,kernel,batch", [
    ((2, 2), (0, 0), (3, 3), 1), ((2, 2), (1, 1), (3, 3), 2), ((2, 2), (0, 1), (4, 3), 1), ((3, 2), (2, 0), (5, 2), 1),
    ((2, 2), (1, 1), (2, 2), 1)])
def test_transposed_conv_by_phases_matches_conv_transpose2d(stride, padding, kernel, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 5, 9, 7, generator=g)
    w = torch.randn(5, 6, *kernel, generator=g)
    for b in (None, torch.randn(6, generator=g)):
        ref = F.conv_transpose2d(x, w, b, stride=stride, padding=padding)
        out = ops.conv_transpose2d_polyphase(x, w, b, stride, padding)
        assert out.shape == ref.shape
        # two summation orders of the same products: each within γ_{K+1}·(Σ|x·w| + |b|) of the float64 value on
        # any CPU; measured ≤ 0.094 of that bound (≤ 3e-6 absolute)
        rounding = _conv_rounding(F.conv_transpose2d, x, w, b, stride=stride, padding=padding)
        assert_within(out, *rounding, "by phases")
        assert_within(ref, *rounding, "conv_transpose2d")


def test_transposed_conv_by_phases_keeps_channels_last():
    """A channels-last input gives a channels-last output (the super-resolution's layers after it stay channels-last:
    a contiguous output made every phase a transposing copy and every later convolution NCHW), same values."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 9, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 5, 3, 3, generator=g), torch.randn(5, generator=g)
    out = ops.conv_transpose2d_polyphase(x, w, b, (2, 2), (1, 1))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_within(out, *_conv_rounding(F.conv_transpose2d, x, w, b, stride=(2, 2), padding=(1, 1)), "channels-last")
    assert ops.conv_transpose2d_polyphase(x.contiguous(), w, b, (2, 2), (1, 1)).is_contiguous()


@pytest.mark.parametrize("capability, out_side, phases", [
    ("AVX512", 512, True), ("AVX512_BF16", 256, True), ("AVX2", 256, True), ("AVX2", 512, False),
    ("DEFAULT", 128, True)])
def test_transposed_convs_run_by_phases_by_a_rule_of_device_and_instruction_set(monkeypatch, capability, out_side,
                                                                                 phases):
    """The path is a rule, not a timing: on CPU by phases except AVX2's 512² outputs (measured slower there), never
    off the CPU (checked on the meta device, which stands in for CUDA: same rule, no GPU needed)."""
    monkeypatch.setattr(ops, "_CPU_CAPABILITY", capability)
    w = torch.empty(8, 4, 3, 3)
    x = torch.empty(1, 8, out_side // 2, out_side // 2)  # as the super-resolution's: output (side + 1)²
    assert ops._by_phases(x, w, (2, 2), (0, 0), 1) is phases
    assert not ops._by_phases(x.to("meta"), w.to("meta"), (2, 2), (0, 0), 1)
    assert not ops._in_chunks(torch.empty(1, 64, 520, 520, device="meta"), True)
    assert ops._in_chunks(torch.empty(1, 64, 520, 520), True) and not ops._in_chunks(torch.empty(1, 64, 520, 520), False)
    # channels-last depthwise runs whole (no NCHW cache effect; a channel slice would be a strided copy)
    assert not ops._in_chunks(torch.empty(1, 64, 520, 520).contiguous(memory_format=torch.channels_last), True)


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


class _ConvOutputShapes(TorchDispatchMode):
    """Records the output shapes of every convolution (forward or backward) that runs inside it."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "convolution" in func.__name__:
            self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                            if isinstance(t, torch.Tensor)]
        return out


def test_double_backward_never_computes_the_constant_filters_gradient():
    """Autograd's double backward of a grouped convolution computes the weight's gradient group by group even
    when the weight is a constant; `frozen_conv2d`'s (its adjoint, then itself) computes only the input's."""
    fir = ops.setup_filter([1, 3, 3, 1])[None, None].repeat(8, 1, 1, 1)
    shapes = {}
    for frozen in (False, True):
        x = torch.randn(1, 8, 16, 16, requires_grad=True)
        w = torch.randn(4, 8, 3, 3, requires_grad=True)
        with _ConvOutputShapes() as rec:
            h = frozen_conv2d(x, fir, padding=1, groups=8) if frozen else F.conv2d(x, fir, padding=1, groups=8)
            (g,) = torch.autograd.grad(F.conv2d(h, w, stride=2).sum(), x, create_graph=True)
            g.square().sum().backward()
        shapes[frozen] = rec.shapes
    filter_grads = [(8, 1, 4, 4), (1, 1, 4, 4)]
    assert any(s in filter_grads for s in shapes[False])  # what the test guards against does happen
    assert not any(s in filter_grads for s in shapes[True])


@pytest.mark.parametrize("batch,stride", [(1, 1), (2, 2)])
def test_depthwise_in_channel_chunks_is_bit_identical(monkeypatch, batch, stride):
    """Large depthwise convolutions (FIR filters) run a few channels at a time: same values and gradients, also
    through a double backward."""
    torch.manual_seed(0)
    x0 = torch.randn(batch, 12, 20, 20)
    fir = ops.setup_filter([1, 3, 3, 1])[None, None].repeat(12, 1, 1, 1)
    w = torch.randn(3, 12, 3, 3)
    results = []
    for chunk_bytes in (1 << 40, 20 * 20 * 4 * batch * 5):  # whole, then chunks of 5 channels (5 + 5 + 2)
        monkeypatch.setattr(ops, "_DEPTHWISE_CHUNK_BYTES", chunk_bytes)
        x = x0.clone().requires_grad_(True)
        wt = w.clone().requires_grad_(True)
        with _ConvOutputShapes() as rec:
            h = frozen_conv2d(x, fir, padding=1, stride=stride, groups=12)
            (g,) = torch.autograd.grad(F.conv2d(h, wt).square().sum(), x, create_graph=True)
            g.square().sum().backward()
        results.append((h.detach(), g.detach(), x.grad, wt.grad))
    assert sum(s[1] == 5 for s in rec.shapes) >= 3  # the chunked run did run in chunks (forward, adjoint, again)
    assert all(torch.equal(a, b) for a, b in zip(*results))


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
