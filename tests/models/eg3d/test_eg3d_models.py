"""EG3D models on tiny configs: shapes, key lists, gradients, determinism, fast paths vs reference maths."""
from __future__ import annotations

import copy

import pytest
import torch

from float64 import Float64Mode, float32_and_float64, rel_err, to_float64
from models.eg3d.config import GeneratorConfig, RendererConfig, RenderingConfig
from models.eg3d.generator import TriPlaneGenerator
from models.eg3d.ray_marcher import MipRayMarcher2
from models.eg3d.ray_sampler import sample_rays
from models.eg3d.renderer import generate_planes, project_onto_planes, sample_pdf
from models.eg3d.triplane_renderer import TriplaneRenderer
from rounding import F64_REL, forward_rel
from tests.conftest import read_key_list
from utils.cameras import frontal_camera, original_test_cameras

# A tiny render in float32 vs its float64 evaluation, relative to the largest |value| (tests/rounding.py): ~20
# products in a row (coarse decode, marching, the sampling pdf, fine decode, marching, the super-resolution's
# convolutions and FIR filters) of ≤ 288 terms (32 channels × 3×3). Measured ≤ 6.0e-6 (image), 3.5e-6 (raw), 4.4e-7
# (depth): the two float32 routes compared below, 7e-6 apart at worst on some CPU, were compared with 1e-5 before.
RENDER_FP32_REL = forward_rel(20, 288)  # 4.1e-5


def _tiny_renderer(seed: int = 0) -> TriplaneRenderer:
    torch.manual_seed(seed)
    r = TriplaneRenderer(RendererConfig.tiny())
    with torch.no_grad():  # make densities neither all empty nor all opaque
        r.decoder.net[2].bias[0] = 2.0
    return r


def _planes(n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 96, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2


def test_renderer_keys_match_original(keys_dir):
    expected = read_key_list(keys_dir / "renderer_state_dict.tsv")
    with torch.device("meta"):
        r = TriplaneRenderer(RendererConfig())
    got = [(k, tuple(v.shape)) for k, v in r.state_dict().items()]
    assert got == expected
    tiny = TriplaneRenderer(RendererConfig.tiny())
    assert list(tiny.state_dict()) == [k for k, _ in expected]


def test_generator_keys_match_g_ema(keys_dir):
    expected = read_key_list(keys_dir / "eg3d_G_ema_state_dict.tsv")  # the list of reference/eg3d.md §4
    assert len(expected) == 177
    with torch.device("meta"):
        g = TriPlaneGenerator(GeneratorConfig())
    assert [(k, tuple(v.shape)) for k, v in g.state_dict().items()] == expected
    assert g.num_ws == 14
    assert list(TriPlaneGenerator(GeneratorConfig.tiny()).state_dict()) == [k for k, _ in expected]


def test_plane_axes_quirk():
    proj = project_onto_planes(generate_planes(), torch.tensor([[[0.1, 0.2, 0.3]]]))
    assert torch.allclose(proj[:, 0], torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.3, 0.1]]))


def test_renderer_shapes_and_broadcast():
    r = _tiny_renderer().eval()
    cams = original_test_cameras()
    planes = _planes(1)
    # one triplane broadcast to 3 views == the same triplane repeated == one view at a time: the same maths by other
    # kernels (batch sizes), so equal in float64; each float32 route within RENDER_FP32_REL of its float64 value
    (out, rep, *ones), (out64, rep64, *ones64) = float32_and_float64(r, lambda m: (
        m(planes, cams), m(planes.expand(3, -1, -1, -1).contiguous(), cams), *(m(planes, c[None]) for c in cams)),
        torch.inference_mode)
    assert out["image"].shape == (3, 3, 64, 64)
    assert out["image_raw"].shape == (3, 3, 16, 16)
    assert out["image_depth"].shape == (3, 1, 16, 16)
    assert out["feature_image"].shape == (3, 32, 16, 16)
    d = out["image_depth"]
    assert d.min() >= 2.25 and d.max() <= 3.3 + 1.05 / 7
    for k in ("image", "image_raw", "image_depth"):
        assert rel_err(rep64[k], out64[k]) <= F64_REL, k  # measured 0
        assert rel_err(out[k], out64[k]) <= RENDER_FP32_REL and rel_err(rep[k], rep64[k]) <= RENDER_FP32_REL, k
    for i, (one, one64) in enumerate(zip(ones, ones64)):
        assert rel_err(one64["image"], out64["image"][i:i + 1]) <= F64_REL  # measured 0
        assert rel_err(one["image"], one64["image"]) <= RENDER_FP32_REL
    with pytest.raises(ValueError):
        r(_planes(2), cams)
    with pytest.raises(ValueError):
        r(torch.zeros(1, 90, 32, 32), cams[:1])


def _reference_render(r: TriplaneRenderer, planes: torch.Tensor, cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original algorithm written with the reference pieces (grid_sample, OSGDecoder.forward, MipRayMarcher2)."""
    cfg = r.config.rendering
    res = r.neural_rendering_resolution
    o, d = sample_rays(cams[:, :16].view(-1, 4, 4), cams[:, 16:].view(-1, 3, 3), res)
    n, m, _ = o.shape
    planes5 = planes.view(n, 3, 32, planes.shape[-2], planes.shape[-1])
    s = cfg.depth_resolution
    depths = torch.linspace(cfg.ray_start, cfg.ray_end, s, dtype=o.dtype).reshape(1, 1, s, 1).repeat(n, m, 1, 1)
    depths += torch.full_like(depths, 0.5) * ((cfg.ray_end - cfg.ray_start) / (s - 1))

    def run(dep):
        pts = (o.unsqueeze(-2) + dep * d.unsqueeze(-2)).reshape(n, -1, 3)
        out = r.renderer.run_model(planes5, r.decoder, pts)
        k = dep.shape[2]
        return out["rgb"].reshape(n, m, k, -1), out["sigma"].reshape(n, m, k, 1)

    marcher = MipRayMarcher2()
    col_c, sig_c = run(depths)
    _, _, w = marcher(col_c, sig_c, depths)
    w = w.reshape(n * m, -1)
    w = torch.nn.functional.max_pool1d(w.unsqueeze(1), 2, 1, padding=1)
    w = torch.nn.functional.avg_pool1d(w, 2, 1).squeeze(1) + 0.01
    z = depths.reshape(n * m, s)
    fine = sample_pdf(0.5 * (z[:, :-1] + z[:, 1:]), w[:, 1:-1], cfg.depth_resolution_importance)
    fine = fine.reshape(n, m, -1, 1)
    col_f, sig_f = run(fine)
    all_d = torch.cat([depths, fine], -2)
    all_c = torch.cat([col_c, col_f], -2)
    all_s = torch.cat([sig_c, sig_f], -2)
    _, idx = torch.sort(all_d, dim=-2)
    all_d = torch.gather(all_d, -2, idx)
    all_c = torch.gather(all_c, -2, idx.expand(-1, -1, -1, all_c.shape[-1]))
    all_s = torch.gather(all_s, -2, idx)
    rgb, depth, _ = marcher(all_c, all_s, all_d)
    return rgb.permute(0, 2, 1).reshape(n, -1, res, res), depth.permute(0, 2, 1).reshape(n, 1, res, res)


def test_fast_renderer_equals_reference_algorithm():
    """The same maths by other routes (a plane table and embedding_bag vs grid_sample, in-place decode, other
    batching): equal in float64; each route in float32 within RENDER_FP32_REL of its float64 value."""
    r = _tiny_renderer().eval()
    cams = original_test_cameras()
    planes = _planes(3)

    def both(m: TriplaneRenderer) -> tuple[torch.Tensor, ...]:
        c, p = cams.to(m.const.dtype), planes.to(m.const.dtype)
        out = m.render_features(p, c)
        return (out["feature_image"], out["image_depth"], *_reference_render(m, p, c))

    (feat, depth, ref_feat, ref_depth), (feat64, depth64, ref_feat64, ref_depth64) = float32_and_float64(
        r, both, torch.inference_mode)
    assert rel_err(feat64, ref_feat64) <= F64_REL  # measured 2.5e-15
    assert rel_err(depth64, ref_depth64) <= F64_REL  # measured 4.8e-16
    for a, a64 in ((feat, feat64), (depth, depth64), (ref_feat, ref_feat64), (ref_depth, ref_depth64)):
        assert rel_err(a, a64) <= RENDER_FP32_REL  # measured ≤ 5.1e-6


def _cached_and_reference_sr(r: TriplaneRenderer, planes: torch.Tensor, cams: torch.Tensor) -> tuple:
    """(image from the cached SR weights, image from the grad path: modulated_conv2d + bias_act), in the renderer's
    dtype (float64 under `Float64Mode` for a doubled renderer)."""
    p, c = planes.to(r.const.dtype), cams.to(r.const.dtype)
    with torch.inference_mode():
        fast = r(p, c)["image"]
    ref = r(p.clone().requires_grad_(True), c)["image"].detach()
    return fast, ref


def test_cached_sr_equals_reference_modulated_conv():
    """The cached weights and the grad path are the same maths by other routes (weights modulated once, or per
    call): equal in float64; each route in float32 within RENDER_FP32_REL of its float64 value."""
    r = _tiny_renderer().eval()
    planes = _planes(1)
    cams = original_test_cameras()
    fast, ref = _cached_and_reference_sr(r, planes, cams)
    with torch.inference_mode():
        assert torch.equal(r(planes, cams)["image"], fast)  # from the weight cache
    with Float64Mode():
        fast64, ref64 = _cached_and_reference_sr(to_float64(copy.deepcopy(r)), planes, cams)
    assert rel_err(fast64, ref64) <= F64_REL  # measured 2.9e-15
    assert rel_err(fast, fast64) <= RENDER_FP32_REL and rel_err(ref, ref64) <= RENDER_FP32_REL  # measured ≤ 5.6e-6
    with torch.no_grad():  # the cache notices parameter updates
        r.superresolution.block1.conv1.weight.mul_(1.5)
        r.const.add_(0.1)
    fast3, ref3 = _cached_and_reference_sr(r, planes, cams)
    assert not torch.allclose(fast3, fast)
    # each within RENDER_FP32_REL of the exact value (shown above for this renderer): measured 8.3e-7 apart
    assert rel_err(fast3, ref3) <= 2 * RENDER_FP32_REL


def test_gradients_flow_to_planes_and_decoder():
    r = _tiny_renderer().train()
    planes = _planes(2).requires_grad_(True)
    cams = original_test_cameras()[:2]
    out = r(planes, cams, deterministic=False)
    loss = out["image"].square().mean() + out["image_raw"].mean() + out["image_depth"].mean()
    loss.backward()
    assert planes.grad is not None and planes.grad.abs().sum() > 0
    for name in ("decoder.net.0.weight", "decoder.net.2.weight", "const", "superresolution.block1.conv1.weight"):
        p = dict(r.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_determinism_and_random_mode():
    r = _tiny_renderer().eval()
    planes, cams = _planes(1), original_test_cameras()
    with torch.inference_mode():
        a = r(planes, cams)["image"]
        b = r(planes, cams)["image"]
        assert torch.equal(a, b)
        c = r(planes, cams, deterministic=False, generator=torch.Generator().manual_seed(3))["image_raw"]
        d = r(planes, cams, deterministic=False, generator=torch.Generator().manual_seed(3))["image_raw"]
        e = r(planes, cams, deterministic=False, generator=torch.Generator().manual_seed(4))["image_raw"]
    assert torch.equal(c, d)
    assert not torch.allclose(c, e)
    assert not torch.allclose(c, r(planes, cams)["image_raw"].detach())


def test_sample_density():
    r = _tiny_renderer()
    coords = torch.rand(2, 50, 3) - 0.5
    sigma = r.sample_density(_planes(2), coords)
    assert sigma.shape == (2, 50, 1) and torch.isfinite(sigma).all()


def test_generator_tiny_forward():
    torch.manual_seed(0)
    g = TriPlaneGenerator(GeneratorConfig.tiny()).eval()
    z = torch.randn(2, g.z_dim)
    c = frontal_camera().repeat(2, 1)
    ws = g.mapping(z, c)
    assert ws.shape == (2, g.num_ws, g.w_dim)
    ws_t = g.mapping(z, c, truncation_psi=0.5)
    assert torch.equal(ws_t, g.backbone.mapping.w_avg.lerp(ws, 0.5))  # bit-exact by construction: the same lerp
    with torch.no_grad():
        out = g.synthesis(ws, c)
        again = g(z, c)
    assert out["planes"].shape == (2, 96, 256, 256)
    assert out["image"].shape == (2, 3, 64, 64)
    assert out["image_raw"].shape == (2, 3, 16, 16)
    assert out["image_depth"].shape == (2, 1, 16, 16)
    assert torch.equal(out["image"], again["image"])  # bit-exact by construction: the same calls on the same ws
    # a 8² neural rendering is resized to the SR input size
    with torch.no_grad():
        small = g.synthesis(ws, c, neural_rendering_resolution=8)
    assert small["image_raw"].shape == (2, 3, 8, 8) and small["image"].shape == (2, 3, 64, 64)
    dens = g.sample_mixed(torch.rand(2, 10, 3) - 0.5, ws)
    assert dens["sigma"].shape == (2, 10, 1)


def test_generator_random_noise_and_grad():
    torch.manual_seed(0)
    g = TriPlaneGenerator(GeneratorConfig.tiny()).train()
    z = torch.randn(1, g.z_dim)
    c = frontal_camera()
    out = g(z, c, noise_mode="random", deterministic=False)
    out["image"].mean().backward()
    assert g.backbone.mapping.fc0.weight.grad.abs().sum() > 0
    assert g.backbone.synthesis.b4.const.grad.abs().sum() > 0


def test_configs_from_eg3d():
    rk = {"depth_resolution": 48, "ray_start": 2.25, "density_reg": 0.25, "superresolution_module": "x",
          "avg_camera_pivot": [0, 0, 0.2], "c_scale": 1}
    rc = RenderingConfig.from_eg3d(rk)
    assert rc.avg_camera_pivot == (0.0, 0.0, 0.2) and rc.c_scale == 1
    assert RenderingConfig.from_eg3d({"depth_resolution": 48}).c_scale == 0.0  # EG3D's .get('c_scale', 0)
    cfg = GeneratorConfig.from_eg3d_kwargs(
        (), {"z_dim": 512, "c_dim": 25, "w_dim": 512, "img_resolution": 512, "img_channels": 3,
             "mapping_kwargs": {"num_layers": 2}, "channel_base": 32768, "channel_max": 512, "sr_num_fp16_res": 4,
             "sr_kwargs": {"channel_base": 32768, "channel_max": 512}, "rendering_kwargs": rk})
    assert cfg.sr_num_fp16_res == 4 and cfg.mapping_layers == 2 and cfg.rendering.depth_resolution == 48
