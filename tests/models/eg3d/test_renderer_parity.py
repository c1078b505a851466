"""Parity of TriplaneRenderer with the original 3DPE/Live3D renderer (fixture made by the official code).

Loads the fixture's renderer_state_dict with strict=True, renders triplane_fp16.float() at the 3 fixture
cameras one by one (batch 1, like the fixture) and all 3 in one batched call, and compares to renders.pt.
"""
from __future__ import annotations

import pytest
import torch

from models.eg3d.config import RendererConfig
from models.eg3d.triplane_renderer import TriplaneRenderer

# max |ours − original| bounds. Both sides are float32 renders, and this one is sensitive to rounding: against our
# float64 evaluation (tests/float64.py; same planes, cameras and weights) the fixture and our float32 render are both
# 2.5e-4 (image_raw) and 8.1e-5 (image_depth) off. Most of it is the rounding of the ray directions (a 4-term bmm,
# whose rounding is the BLAS kernel's): computing that product exactly moves image / image_raw / image_depth by
# 2.2e-4 / 1.7e-4 / 7.6e-5 (views 0 and 2). Ours and the fixture agree to ~1e-5 only because the machines measured
# round it alike. So E = the float32 error of each quantity (image: the 512² SR in float64 is too slow for a test,
# scaled from image_raw by the ray-direction sensitivities, 2.2/1.7), two right renders are ≤ 2E apart, TOL = 4E.
TOL = {
    "image": 1.3e-3,  # measured 1.29e-5 (view 2) on the fixture author's CPU, 1.24e-5 (view 0) on an AVX-512 CPU
    "image_raw": 1e-3,  # measured 8.58e-6 (view 1); 7.7e-6
    "image_depth": 3.3e-4,  # measured 3.34e-6 (view 1); 3.6e-6 (view 2)
}
KEYS = tuple(TOL)


@pytest.fixture(scope="module")
def fixture_data(reference_dir):
    fx = reference_dir / "fixtures"
    sd = torch.load(fx / "renderer_state_dict.pt", weights_only=True)
    planes = torch.load(fx / "triplane_fp16.pt", weights_only=True)["triplane"]
    renders = torch.load(fx / "renders.pt", weights_only=True)
    renderer = TriplaneRenderer(RendererConfig())
    renderer.load_state_dict(sd, strict=True)
    return renderer.eval(), planes, renders


def _check(out: dict, views: list[dict], label: str) -> None:
    for i, ref in enumerate(views):
        diffs = {k: (out[k][i:i + 1] - ref[k]).abs().max().item() for k in KEYS}
        print(f"{label} view {i}: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
        for k, v in diffs.items():
            assert v <= TOL[k], f"{label} view {i} {k}: max abs diff {v} > {TOL[k]}"


def test_fixture_loads_strict_and_shapes(fixture_data):
    renderer, planes, renders = fixture_data
    assert planes.dtype == torch.float16 and planes.shape == (1, 96, 256, 256)
    assert renders["neural_rendering_resolution"] == renderer.neural_rendering_resolution == 128


def test_parity_one_by_one(fixture_data):
    renderer, planes, renders = fixture_data
    planes = planes.float()
    cams = renders["cameras"]
    with torch.inference_mode():
        outs = [renderer(planes, cams[i:i + 1]) for i in range(cams.shape[0])]
    merged = {k: torch.cat([o[k] for o in outs]) for k in KEYS}
    assert merged["image"].shape == (3, 3, 512, 512)
    assert merged["image_raw"].shape == (3, 3, 128, 128)
    assert merged["image_depth"].shape == (3, 1, 128, 128)
    _check(merged, renders["views"], "single")


def test_parity_batched(fixture_data):
    renderer, planes, renders = fixture_data
    with torch.inference_mode():
        out = renderer(planes.float(), renders["cameras"])
    assert out["feature_image"].shape == (3, 32, 128, 128)
    _check(out, renders["views"], "batched")
