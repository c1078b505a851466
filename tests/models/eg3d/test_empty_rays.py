"""Rays that cross empty space (every density far below 0, Σw = 0) keep EG3D's depth and get zero gradients.

EG3D computes depth = Σ w t̄ / Σ w, then NaN → inf, then clamps. For an empty ray that is 0/0: the forward value
is right after the NaN → inf, but its gradient is NaN, and through the depth loss it turned every trained weight
of a tiny student into NaN after one step. The renderer (and the reference ray marcher) divide by 1 there instead.
"""
from __future__ import annotations

import math

import torch

from models.eg3d.config import RendererConfig
from models.eg3d.ray_marcher import MipRayMarcher2
from models.eg3d.triplane_renderer import TriplaneRenderer
from utils.cameras import look_at_cameras


def _make_empty(renderer: TriplaneRenderer) -> None:
    """Raw density −1000 everywhere: softplus underflows to exactly 0, so every weight is 0."""
    fc1 = renderer.decoder.net[2]
    with torch.no_grad():
        fc1.weight[0].zero_()
        fc1.bias[0] = -1000.0


def test_empty_rays_have_far_depth_and_finite_gradients():
    torch.manual_seed(0)
    renderer = TriplaneRenderer(RendererConfig.tiny()).eval()
    _make_empty(renderer)
    planes = (0.1 * torch.randn(1, 96, 32, 32)).requires_grad_(True)
    cams = look_at_cameras(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2]))
    out = renderer(planes, cams, neural_rendering_resolution=8)
    depth = out["image_depth"]
    ray_end = renderer.config.rendering.ray_end
    assert torch.isfinite(depth).all()
    assert torch.all(depth == depth.max()) and depth.max() >= ray_end  # empty: clamped to the farthest sample
    (depth.mean() + out["image"].mean()).backward()
    assert torch.isfinite(planes.grad).all()
    for name, p in renderer.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_reference_marcher_empty_ray_gradient_is_finite_and_hit_rays_unchanged():
    depths = torch.linspace(2.25, 3.3, 8).view(1, 1, 8, 1).expand(1, 2, 8, 1).contiguous()
    densities = torch.stack([torch.full((8, 1), -1000.0), torch.linspace(-2, 4, 8)[:, None]])[None]
    densities.requires_grad_(True)
    colors = torch.rand(1, 2, 8, 3)
    rgb, depth, weights = MipRayMarcher2()(colors, densities, depths)
    assert depth[0, 0, 0] == depths.max()  # empty ray: far end, as EG3D
    w = weights[0, 1, :, 0].detach()
    expected = (w * (depths[0, 1, :-1, 0] + depths[0, 1, 1:, 0]) / 2).sum() / w.sum()
    # two orders of the same positive sums (7 terms over 7) and a division: each ≤ γ_17·3.3 = 3.3e-6 from the exact
    # depth on any CPU, so within assert_close's float32 tolerance (1e-5 + 1.3e-6·3.3)
    torch.testing.assert_close(depth[0, 1, 0], expected)
    depth.sum().backward()
    assert torch.isfinite(densities.grad).all()
