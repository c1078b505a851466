"""utils/cameras.py: EG3D conventions, the original's test/training/video cameras."""
from __future__ import annotations

import math

import pytest
import torch

from rounding import U32
from utils.cameras import (FOCAL_3DPE, FOCAL_EG3D_LABEL, fov_to_focal_3dpe, frontal_camera, intrinsics,
                           look_at_cameras, orbit_cameras, original_test_cameras, parse_camera_label,
                           sample_training_cameras)

# A camera entry of size ≤ 2.7 (a position; rotations are ≤ 1) is the result of ≲ 16 float32 roundings: the angles'
# casts, arccos/sin/cos (≤ 1 ulp each in SLEEF's vectorised and glibc's scalar versions), the products, the
# normalisations and cross products (4×4 product with the translation: exact, 0s and 1s). So it is within
# 16·U32·2.7 = 2.6e-6 of its exact value on any CPU. Measured against a float64 evaluation (tests/float64.py's
# Float64Mode) over 2000 training cameras: ≤ 4.8·U32·2.7 (entries), ≤ 1.8·U32·2.7 (|position| − 2.7).
R_TOL = 16 * U32 * 2.7


def test_focal_constants():
    assert FOCAL_EG3D_LABEL == 4.2647
    assert abs(FOCAL_3DPE - 4.26339) < 1e-4
    assert abs(fov_to_focal_3dpe(18.837) - FOCAL_3DPE) < 1e-12
    k = intrinsics(2.0, 0.4, 0.6)
    assert torch.equal(k, torch.tensor([[2.0, 0, 0.4], [0, 2.0, 0.6], [0, 0, 1]]))


def test_frontal_camera():
    c = frontal_camera()
    assert c.shape == (1, 25) and c.dtype == torch.float32
    c2w = c[0, :16].view(4, 4)
    expected = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]])
    assert torch.allclose(c2w, expected, rtol=0, atol=R_TOL)  # measured 1.2e-7 (cos of π/2 rounded to float32)
    # camera at (0, 0, 2.7), looking (+z camera axis = third column) at the pivot (0, 0, 0.2)
    origin = c2w[:3, 3]
    to_pivot = torch.tensor([0.0, 0.0, 0.2]) - origin
    # the same subtraction, norm of 3 terms and division on either side (another reduction kernel at most):
    # ≤ 2·6 roundings of entries ≤ 1, 7.2e-7. Measured 0.
    assert torch.allclose(c2w[:3, 2], to_pivot / to_pivot.norm(), rtol=0, atol=12 * U32)
    assert torch.allclose(c[0, 16:], torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]))


def test_look_at_accepts_scalars_and_tensors():
    a = look_at_cameras(math.pi / 2 + 0.3, math.pi / 2 - 0.1)
    b = look_at_cameras(torch.tensor([math.pi / 2 + 0.3, math.pi / 2]), math.pi / 2 - 0.1)
    assert a.shape == (1, 25) and b.shape == (2, 25)
    assert torch.allclose(a[0], b[0], rtol=0, atol=2 * R_TOL)  # batch 1 vs 2 (other vector kernels); measured 0
    r = b[:, [3, 7, 11]].norm(dim=1)
    assert torch.allclose(r, torch.full((2,), 2.7), rtol=0, atol=R_TOL)  # measured 0
    rot = b[:, :16].view(-1, 4, 4)[:, :3, :3]
    eye = torch.eye(3).expand(2, 3, 3)
    # 20·U32: two normalised columns (≲ 6 roundings each) and a 3-term dot product. Measured ≤ 4·U32 (2000 cameras).
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, rtol=0, atol=20 * U32)


def test_original_test_cameras_match_fixture(reference_dir):
    renders = torch.load(reference_dir / "fixtures" / "renders.pt", weights_only=True)
    cams = original_test_cameras()
    assert cams.shape == (3, 25)
    diff = (cams - renders["cameras"]).abs().max().item()
    print(f"original_test_cameras vs fixture: max abs diff {diff:.3g}")
    # measured 0 (bit-exact here); two float32 evaluations, each within R_TOL of the exact value on any CPU
    assert diff <= 2 * R_TOL


def test_training_camera_ranges():
    g = torch.Generator().manual_seed(0)
    c = sample_training_cameras(2000, generator=g)
    assert c.shape == (2000, 25)
    assert torch.equal(c, sample_training_cameras(2000, generator=torch.Generator().manual_seed(0)))
    pos = c[:, [3, 7, 11]]
    assert torch.allclose(pos.norm(dim=1), torch.full((2000,), 2.7), rtol=0, atol=R_TOL)  # measured 2.4e-7
    focal = c[:, 16]
    lo, hi = fov_to_focal_3dpe(18.837 + 2.4), fov_to_focal_3dpe(18.837 - 2.4)
    assert focal.min() >= lo - 1e-4 and focal.max() <= hi + 1e-4
    assert (focal.max() - focal.min()) > 0.8 * (hi - lo)
    for col in (18, 21):  # cx, cy
        assert c[:, col].min() >= 0.4 - 1e-6 and c[:, col].max() <= 0.6 + 1e-6
    # polar angle from +y: pitch = arccos(y/r) ∈ π/2 ± 26°; yaw from x,z: x = r sinφ cos(π-θ), z = r sinφ sin(π-θ)
    pitch = torch.arccos(pos[:, 1] / 2.7)
    yaw = math.pi - torch.atan2(pos[:, 2], pos[:, 0])
    assert (pitch - math.pi / 2).abs().max() <= math.radians(26) + 1e-3
    assert (yaw - math.pi / 2).abs().max() <= math.radians(49) + 1e-3
    assert (yaw - math.pi / 2).abs().max() >= math.radians(45)


def test_orbit_cameras():
    c = orbit_cameras(288)
    assert c.shape == (288, 25)
    assert torch.allclose(c[:, [3, 7, 11]].norm(dim=1), torch.full((288,), 2.7), rtol=0, atol=R_TOL)  # measured 2.4e-7
    assert torch.allclose(c[:, 16], torch.full((288,), FOCAL_3DPE))


def test_parse_camera_label():
    label = frontal_camera()[0].tolist()
    assert torch.equal(parse_camera_label(label), frontal_camera()[0])
    with pytest.raises(ValueError):
        parse_camera_label([0.0] * 24)
