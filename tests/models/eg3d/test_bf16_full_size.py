"""bf16 autocast on the code paths of the full-size models, without building the whole full-size pipeline.

A new user's `python benchmarks/bench_inference.py --device cpu --precision fp32 bf16` failed with "addmv input
tensors must have the same dtype" in the decoder. The cause was not the model size: the editor renders float32
triplanes, and under CPU autocast the decoder's `addmm` ran in bf16 while its `addmv` (not on autocast's list)
met the float32 weights; the tiny bf16 training test only rendered the bf16 triplanes its encoder returned, and
no test rendered through the editor in bf16. What full-size models add is checked here at full width on few
rays / small images: the decoder 32→64→33, 48+48 samples per ray over several ray chunks of 256² planes,
`FrozenDecode` (training), the super-resolution at 256/128 channels with its folded weights, transposed
convolutions by phases and FIR filters in channel chunks (forced on by a lower threshold).

Tolerances: bf16 keeps 8 significant bits, a relative rounding of u = 2^-8 per cast; convolutions accumulate in
float32, so each bf16 layer adds about u of relative error (its input and weight casts). The neural rendering
(lookup, decoder, ray marching, compositing) runs in float32 under autocast, so there the results are exact.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.eg3d import ops
from models.eg3d import renderer as renderer_module
from models.eg3d.config import RenderingConfig
from models.eg3d.decoder import OSGDecoder
from models.eg3d.renderer import ImportanceRenderer
from models.eg3d.ray_sampler import sample_rays
from models.eg3d.superresolution import SuperresolutionHybrid8XDC
from utils.cameras import original_test_cameras

U = 2.0**-8  # bf16's relative rounding (8 significant bits)


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def node_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `t`."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _full_size_rendering(n_rays: int = 96, chunk: int = 32):
    """Full-width decoder, full sampling (48+48, `chunk` rays per chunk), 256² planes, and `n_rays` rays of the
    frontal 128² camera (a row through the face)."""
    torch.manual_seed(0)
    decoder = OSGDecoder(32, 64, 32).requires_grad_(False)
    r = ImportanceRenderer(RenderingConfig(ray_chunk=chunk))
    planes = 0.5 * torch.randn(1, 3, 32, 256, 256)
    cam = original_test_cameras((0.0,), 0.0)
    o, d = sample_rays(cam[:, :16].view(-1, 4, 4), cam[:, 16:].view(-1, 3, 3), 128)
    row = slice(64 * 128 + 64 - n_rays // 2, 64 * 128 + 64 + n_rays // 2)
    return r, decoder, planes, o[:, row], d[:, row]


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean().sqrt() / b.float().square().mean().sqrt())


def test_decoder_fast_path_runs_in_one_dtype_under_autocast():
    """The failing call itself: float32 plane sums under CPU autocast (float32 out, equal to float32), and bf16
    plane sums (bf16 out, within a few u of float32: two layers)."""
    torch.manual_seed(0)
    dec = OSGDecoder(32, 64, 32)
    x = torch.randn(4096, 32)
    with torch.no_grad():
        ref_s, ref_c = dec.raw_from_plane_sum(x)
        with _bf16():
            s, c = dec.raw_from_plane_sum(x)
        s16, c16 = dec.raw_from_plane_sum(x.bfloat16())
    assert s.dtype == c.dtype == torch.float32 and torch.equal(s, ref_s) and torch.equal(c, ref_c)
    assert s16.dtype == c16.dtype == torch.bfloat16
    assert _rel_rms(s16, ref_s) <= 4 * U and _rel_rms(c16, ref_c) <= 4 * U


def test_full_size_neural_rendering_is_float32_and_exact_under_autocast():
    """Float32 planes (the editor) and bf16 planes (an encoder under autocast) at full width over three ray
    chunks: float32 outputs equal to the float32 rendering of the same values (autocast is off inside)."""
    r, dec, planes, o, d = _full_size_rendering()
    with torch.inference_mode():
        ref = r(planes, dec, o, d)
        ref16 = r(planes.bfloat16().float(), dec, o, d)
        with _bf16():
            out = r(planes, dec, o, d)
            out16 = r(planes.bfloat16(), dec, o, d)
    for a, b, a16, b16 in zip(out, ref, out16, ref16):
        assert a.dtype == a16.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.equal(a, b) and torch.equal(a16, b16)


def test_frozen_decode_serves_bf16_training_at_full_width():
    """The student's bf16 triplane under autocast renders through `FrozenDecode`/`CompositeColours` (nothing of
    the MLP kept for backward) and gets plain float32 autograd's gradient, rounded once to bf16 (≤ u relative)."""
    r, dec, planes, o, d = _full_size_rendering(n_rays=64)
    w = torch.randn(1, 64, 32)

    def grad(p: torch.Tensor, autocast: bool, recompute: bool) -> tuple[torch.Tensor, set[str]]:
        saved = renderer_module.RECOMPUTE_FROZEN_DECODE
        renderer_module.RECOMPUTE_FROZEN_DECODE = recompute
        try:
            p = p.clone().requires_grad_(True)
            with _bf16() if autocast else torch.autocast("cpu", enabled=False):
                rgb, depth, _ = r(p, dec, o, d)
            loss = (rgb * w).sum() + depth.sum()
            loss.backward()
        finally:
            renderer_module.RECOMPUTE_FROZEN_DECODE = saved
        return p.grad, node_names(loss)

    g16, names = grad(planes.bfloat16(), True, True)
    g_ref, ref_names = grad(planes.bfloat16().float(), False, False)
    assert {"FrozenDecodeBackward", "CompositeColoursBackward"} <= names
    assert "FrozenDecodeBackward" not in ref_names
    assert g16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
    scale = float(g_ref.abs().max())
    torch.testing.assert_close(g16.float(), g_ref, rtol=U, atol=1e-5 * scale)


def _full_width_sr(monkeypatch) -> SuperresolutionHybrid8XDC:
    """The super-resolution at full width (256 and 128 channels, w_dim 512) for a 16² input → 64², its FIR filters
    run in channel chunks as at 512² (threshold lowered)."""
    monkeypatch.setattr(ops, "_DEPTHWISE_CHUNK_BYTES", 100_000)
    torch.manual_seed(0)
    sr = SuperresolutionHybrid8XDC(channels=32, img_resolution=64, channel_max=512, w_dim=512,
                                   fused_modconv_default="inference_only")
    sr.channels_last = True
    return sr.eval().requires_grad_(False)


def test_full_width_superresolution_inference_under_autocast(monkeypatch):
    """Folded (cached) weights are used for bf16 activations too, the image comes out float32, and it is within
    6u relative RMS of float32 (5 convolutions + toRGB in bf16; the 3-channel skip image stays float32). The
    cache filled under autocast is float32's: a float32 call after it gives what a fresh one gives."""
    sr = _full_width_sr(monkeypatch)
    feats = torch.randn(1, 32, 16, 16)
    ws = torch.randn(1, 3, 512)
    with torch.inference_mode():
        with _bf16():
            img16 = sr(feats[:, :3], feats, ws, noise_mode="none")
        assert sr.block1.conv1._cache is not None and sr.block1.torgb._cache is not None  # the folded path
        ref = sr(feats[:, :3], feats, ws, noise_mode="none")
        for m in sr.modules():
            if hasattr(m, "_cache"):
                m._cache = None
        assert torch.equal(sr(feats[:, :3], feats, ws, noise_mode="none"), ref)
    assert img16.dtype == torch.float32 and torch.isfinite(img16).all()
    assert _rel_rms(img16, ref) <= 6 * U
    psnr = 10 * math.log10(4.0 / float((img16.clamp(-1, 1) - ref.clamp(-1, 1)).square().mean()))
    assert psnr >= 35.0, psnr


def test_full_width_superresolution_backward_under_autocast(monkeypatch):
    """Training sends gradients through the frozen super-resolution: under autocast its convolutions still keep
    no input (`_FrozenConv`, no autograd convolution node) and the feature gradient stays within 24u relative RMS
    of float32's: ~12 bf16 convolutions (forward and backward) add ~u each, and the leaky ReLUs' slopes flip
    where bf16 moves an activation across zero (measured 0.045–0.050 ≈ 12u, the same as plain autograd under
    autocast gives)."""
    sr = _full_width_sr(monkeypatch)
    feats = torch.randn(1, 32, 16, 16)
    ws = torch.randn(1, 3, 512)
    w = torch.randn(1, 3, 64, 64)

    def grad(autocast: bool) -> tuple[torch.Tensor, set[str]]:
        x = feats.clone().requires_grad_(True)
        with _bf16() if autocast else torch.autocast("cpu", enabled=False):
            img = sr(x[:, :3], x, ws, noise_mode="none")
        loss = (img * w).sum()
        loss.backward()
        return x.grad, node_names(loss)

    g16, names = grad(True)
    g_ref, _ = grad(False)
    assert "_FrozenConvBackward" in names and "ConvolutionBackward0" not in names
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert _rel_rms(g16, g_ref) <= 24 * U


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_frozen_conv2d_under_autocast_equals_autocast_conv(monkeypatch, depthwise, x_dtype):
    """`frozen_conv2d` under autocast: autocast's own convolution values and input gradient, bit for bit (the
    same bf16 operands), also for a depthwise filter run in channel chunks, and for an input that is bf16 already
    (a layer after the first): the weight reaches `_FrozenConv` (and its backward) in bf16 too."""
    monkeypatch.setattr(ops, "_DEPTHWISE_CHUNK_BYTES", 10_000)
    weight_dtypes = []
    apply = ops._FrozenConv.apply

    def spy(*args):
        weight_dtypes.append(args[1].dtype)
        return apply(*args)

    monkeypatch.setattr(ops._FrozenConv, "apply", spy)
    torch.manual_seed(0)
    c = 16
    x0 = torch.randn(1, c, 24, 24).to(x_dtype)
    weight = torch.randn(c, 1, 4, 4) if depthwise else torch.randn(8, c, 3, 3)
    bias = torch.randn(weight.shape[0])
    groups = c if depthwise else 1
    g = torch.randn(1, weight.shape[0], 21 if depthwise else 22, 21 if depthwise else 22).bfloat16()
    outs = []
    for frozen in (True, False):
        x = x0.clone().requires_grad_(True)
        with _bf16():
            y = ops.frozen_conv2d(x, weight, bias, groups=groups) if frozen else \
                F.conv2d(x, weight, bias, groups=groups)
        y.backward(g)
        outs.append((y, x.grad, node_names(y)))
    (y, gx, names), (y_ref, gx_ref, _) = outs
    assert "_FrozenConvBackward" in names and y.dtype == torch.bfloat16 and weight_dtypes == [torch.bfloat16]
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_editor_bf16_edit_and_render():
    """The user's path on tiny models: prompt, edit and render under `precision='bf16'` (it crashed at any
    size). Rendering the float32 editor's triplane, the neural rendering equals float32's and the super-resolved
    image is within 6u relative RMS; the bf16 encoders' triplane is within 5% of float32's (random weights)."""
    from pipelines.editor import PortraitEditor

    cams = original_test_cameras((-30.0, 0.0, 30.0), 0.0)
    gen = torch.Generator().manual_seed(0)
    img, ref = (torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1 for _ in range(2))
    results = {}
    for precision in ("fp32", "bf16"):
        ed = PortraitEditor.random_init(kind="edit", tiny=True, seed=0, device="cpu", precision=precision)
        planes = ed.edit(img, ed.prompt(reference=ref))
        results[precision] = (ed, planes, ed.render(planes, cams))
    ed16, planes16, out16 = results["bf16"]
    _, planes32, out32 = results["fp32"]
    assert planes16.dtype == torch.float32 and _rel_rms(planes16, planes32) <= 0.05
    for k, v in out16.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    same = ed16.render(planes32, cams)
    assert torch.equal(same["image_raw"], out32["image_raw"]) and torch.equal(same["image_depth"], out32["image_depth"])
    assert _rel_rms(same["image"], out32["image"]) <= 6 * U
