"""utils.face_alignment: the EG3D in-the-wild crop, its box form, pose estimate, labels, detectors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import utils.face_alignment as fa
from rounding import U32
from utils.errors import NoFaceError
from utils.face_alignment import (
    EMPIRICAL_LANDMARKS_512,
    STANDARD_LANDMARKS_3D,
    TEMPLATE_LANDMARKS_512,
    CropBox,
    Face,
    FileLandmarks,
    LandmarkDetector,
    MTCNNDetector,
    align_face,
    camera_label_for_crop,
    crop_box,
    crop_image,
    eg3d_crop,
    estimate_yaw_pitch,
    map_points_to_crop,
    pos_fit,
)

ROOT = Path(__file__).resolve().parents[2]
FRONTAL_LABEL = [1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1, 4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]


def frontal_landmarks(cx: float, cy: float, k: float) -> np.ndarray:
    """Exact frontal orthographic projection of the standard 3D landmarks (pixels, y down)."""
    return np.stack([cx + k * STANDARD_LANDMARKS_3D[:, 0], cy - k * STANDARD_LANDMARKS_3D[:, 1]], axis=1)


def truncation_slack(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Largest shift (crop pixels, N×2) the chain's int truncations can give points (pixel indices) of a W×H image.

    With c = 512/700, ε = W·s − int(W·s) ∈ [0, 1) and f the truncation of the 1024-crop offset (|f| < 1), a
    point x lands at c·(f + ε·(1/2 − (x + 0.5)/W)) from where exact arithmetic puts it (W → H for y).
    Which way int() goes can hinge on the last bit of the POS fit, so tests bound by this, not by one outcome.
    """
    return 512 / 700 * (1 + np.abs(0.5 - (np.asarray(points, dtype=np.float64) + 0.5) / np.array(size)))


def textured_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth random colour texture (coarse noise upsampled), so resampling differences would show."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w + 16, h + 16), Image.BILINEAR).crop((8, 8, w + 8, h + 8))
    arr = np.asarray(img).copy()
    arr ^= rng.integers(0, 24, size=arr.shape, dtype=np.uint8)  # fine detail too
    return Image.fromarray(arr)


def eg3d_by_hand(img: Image.Image, lm: np.ndarray) -> Image.Image:
    """EG3D's in-the-wild crop written out step by step (eg3d_crop.md §2)."""
    W0, H0 = img.size
    # 1. flip y
    lm = np.array(lm, dtype=np.float64).copy()
    lm[:, 1] = H0 - 1 - lm[:, 1]
    # 2. POS: one 10×8 least-squares system, rows [X Y Z 1 0 0 0 0] and [0 0 0 0 X Y Z 1]
    A = np.zeros((10, 8))
    rhs = np.zeros(10)
    for i in range(5):
        A[2 * i, 0:3] = STANDARD_LANDMARKS_3D[i]
        A[2 * i, 3] = 1
        A[2 * i + 1, 4:7] = STANDARD_LANDMARKS_3D[i]
        A[2 * i + 1, 7] = 1
        rhs[2 * i], rhs[2 * i + 1] = lm[i, 0], lm[i, 1]
    k = np.linalg.lstsq(A, rhs, rcond=None)[0]
    s_pos = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    tx, ty = k[3], k[7]
    # 3. resize factor
    s = 300 / s_pos
    # 4. whole-image BICUBIC resize to truncated sizes
    w, h = int(W0 * s), int(H0 * s)
    big = img.resize((w, h), resample=Image.BICUBIC)
    # 5. 1024 crop at truncated offsets, black outside
    left = int(w / 2 - 512 + (tx - W0 / 2) * s)
    up = int(h / 2 - 512 + (H0 / 2 - ty) * s)
    c1024 = big.crop((left, up, left + 1024, up + 1024))
    # 6. 700 centre crop at 162
    off = int(1024 / 2 - 700 / 2)
    assert off == 162
    c700 = c1024.crop((off, off, off + 700, off + 700))
    # 7. LANCZOS to 512
    return c700.resize((512, 512), resample=Image.LANCZOS)


def test_template_constants():
    assert STANDARD_LANDMARKS_3D.shape == (5, 3)
    assert np.linalg.norm(STANDARD_LANDMARKS_3D[0, :2] - STANDARD_LANDMARKS_3D[1, :2]) == pytest.approx(0.621285, abs=1e-5)
    np.testing.assert_allclose(STANDARD_LANDMARKS_3D.mean(0), [-0.000427, -0.045744, 0.252886], atol=1e-6)
    np.testing.assert_allclose(TEMPLATE_LANDMARKS_512[0], [187.65, 192.29], atol=0.01)
    np.testing.assert_allclose(TEMPLATE_LANDMARKS_512[4], [310.52, 339.66], atol=0.01)


def test_pos_fit_on_exact_projection():
    lm = frontal_landmarks(300.0, 200.0, 150.0)
    s_pos, t = pos_fit(lm, 480)
    assert s_pos == pytest.approx(150.0, rel=1e-9)
    np.testing.assert_allclose(t, [300.0, 480 - 1 - 200.0], atol=1e-9)
    box = crop_box(lm, 480)
    assert box.size == pytest.approx(700 / 300 * 150)
    assert (box.center_x, box.center_y) == pytest.approx((300.0, 201.0))


@pytest.mark.parametrize("s_rounding", [0.0, 1e-12, -1e-12], ids=["as-fitted", "s-low", "s-high"])
@pytest.mark.parametrize(
    "size,center,k",
    [((640, 560), (320.0, 260.0), 200.0), ((800, 700), (401.3, 330.7), 219.4286), ((1000, 900), (480.2, 440.9), 400.0)],
)
def test_frontal_projection_lands_on_template(size, center, k, s_rounding):
    """Gaussian dots drawn at an exact frontal projection land on the template points of the crop.

    Template points are the closed-form continuous coordinates (256 + 219.43·X, 256 − 219.43·Y).
    EG3D's chain puts them at pixel index 255.5 + 219.43·X + m/2 + δx, 255.5 − 219.43·Y − m/2 + δy
    (m: magnification, from its y' = H − 1 − y flip; δ from the int truncations, see `truncation_slack`).

    For k = 200 and 400, W·s and H·s are whole numbers in exact arithmetic, so whether int() lands on
    them or one below depends on the last bit of the POS fit (1.5 vs 1.4999999999999998 from
    the same lstsq on other CPUs/BLAS builds). `s_rounding` nudges s_pos by 1e-12 relative either way
    (far above the fit's rounding, far below any visible change), so both outcomes are checked on every machine.
    """
    w, h = size
    lm = frontal_landmarks(center[0], center[1], k)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sigma = 0.02 * k  # ≈ 4.4 px in the crop
    canvas = np.zeros((h, w))
    for x, y in lm:
        canvas += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    img = Image.fromarray(np.repeat((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, 2))
    s_pos, t = pos_fit(lm, h)
    box = CropBox.from_pos(s_pos * (1 + s_rounding), t, h)
    if s_rounding == 0:
        assert box == crop_box(lm, h)
    crop = np.asarray(crop_image(img, box)).astype(np.float64)[..., 1]
    found = []
    for ex, ey in TEMPLATE_LANDMARKS_512:
        x0, y0 = int(round(ex)) - 15, int(round(ey)) - 15
        win = crop[y0 : y0 + 31, x0 : x0 + 31]
        wy, wx = np.mgrid[y0 : y0 + 31, x0 : x0 + 31]
        found.append(((win * wx).sum() / win.sum(), (win * wy).sum() / win.sum()))
    found = np.array(found)
    m = 512 / box.size
    # what the truncations can give (1e-9 ≫ the ~1e-13 float noise of these sums)
    delta_max = truncation_slack(lm, size) + 1e-9
    spread_max = 512 / 700 * np.ptp(lm, axis=0) / np.array(size) + 1e-9  # the ε term's spread, ε < 1
    ideal = TEMPLATE_LANDMARKS_512 - 0.5 + np.array([m / 2, -m / 2])
    # the image itself: dots land where the chain says (centroid error measured ≤ 0.018 px)
    assert (np.abs(found - ideal) <= delta_max + 0.1).all()
    mapped = map_points_to_crop(lm, box, size)
    np.testing.assert_allclose(found, mapped, atol=0.1)  # the point mapping is the image chain's
    offset = mapped - ideal
    assert (np.abs(offset) <= delta_max).all()
    # the same offset for all five points, up to int(W·s)/W ≠ s (at most one pixel of W·s)
    assert (np.ptp(offset, axis=0) <= spread_max).all()
    if s_rounding > 0 and k in (200.0, 400.0):  # one below the whole number: the nudge did truncate
        assert np.ptp(offset, axis=0).max() > 0.1


@pytest.mark.parametrize(
    "size,lm_args,seed",
    [
        ((640, 480), (320.0, 210.0, 130.0), 0),  # downscale
        ((256, 320), (50.0, 140.0, 60.0), 1),  # upscale, face at the left edge → black borders
        ((500, 375), (430.0, 330.0, 70.0), 2),  # partly outside bottom-right
    ],
)
def test_crop_equals_eg3d_by_hand(size, lm_args, seed):
    rng = np.random.default_rng(seed)
    img = textured_image(*size, seed=seed)
    lm = frontal_landmarks(*lm_args)
    # a turned, rolled, imperfect face: rotate in-plane and jitter the points
    ang = math.radians(rng.uniform(-15, 15))
    c = lm.mean(0)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    lm = (lm - c) @ rot.T + c + rng.normal(0, 2.0, size=(5, 2))
    ours = np.asarray(eg3d_crop(img, lm))
    ref = np.asarray(eg3d_by_hand(img, lm))
    assert ours.shape == (512, 512, 3)
    np.testing.assert_array_equal(ours, ref)
    if seed == 1:
        assert (ref[:, :20] == 0).all()  # black outside the image


def test_region_resize_path_matches_full_resize(monkeypatch):
    """Large upscales resample only the visible region; it gives the same crop up to PIL's tap rounding."""
    img = textured_image(400, 300, seed=3)
    lm = frontal_landmarks(150.0, 120.0, 40.0)
    full = np.asarray(eg3d_crop(img, lm)).astype(int)
    monkeypatch.setattr(fa, "_MAX_FULL_RESIZE_PIXELS", 0)
    region = np.asarray(eg3d_crop(img, lm)).astype(int)
    assert np.abs(full - region).max() <= 3
    assert np.abs(full - region).mean() < 0.05


def test_crop_box_roundtrip_and_box_form():
    img = textured_image(400, 300, seed=4)
    lm = frontal_landmarks(200.0, 140.0, 90.0)
    box = crop_box(lm, img.height)
    s_pos, t = pos_fit(lm, img.height)
    assert box.to_pos(img.height)[0] == pytest.approx(s_pos)
    np.testing.assert_allclose(box.to_pos(img.height)[1], t)
    same = CropBox(box.center_x, box.center_y, box.size)
    np.testing.assert_array_equal(np.asarray(crop_image(img, same)), np.asarray(eg3d_crop(img, lm)))
    x0, y0, x1, y1 = box.corners()
    assert x1 - x0 == pytest.approx(box.size) and (x0 + x1) / 2 == pytest.approx(box.center_x)
    # the box corners land on the crop corners
    # (here H·s = 1000.0000000000013 and the crop offset −41.99999999999984: int() sits on an edge)
    corner_px = np.array([[x0 - 0.5, y0 - 0.5], [x1 - 0.5, y1 - 0.5]])
    corners = map_points_to_crop(corner_px, box, img.size)
    assert (np.abs(corners - [[-0.5, -0.5], [511.5, 511.5]]) <= truncation_slack(corner_px, img.size)).all()
    # a hand-made box (e.g. smoothed in a video): shifting the centre by d px shifts the content by d·512/size
    # (same s, so only the offset truncation differs: less than 512/700 px)
    moved = CropBox(box.center_x + 10, box.center_y, box.size)
    p = map_points_to_crop(lm, moved, img.size) - map_points_to_crop(lm, box, img.size)
    np.testing.assert_allclose(p[:, 0], -10 * 512 / box.size, atol=512 / 700 + 1e-9)  # measured 0.24
    assert np.asarray(crop_image(img, box, output_size=256)).shape == (256, 256, 3)


def test_roll_stays_in_picture():
    lm = frontal_landmarks(300.0, 250.0, 120.0)
    ang = math.radians(20)
    c = lm.mean(0)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    lm_rolled = (lm - c) @ rot.T + c
    box = crop_box(lm_rolled, 600)
    out = map_points_to_crop(lm_rolled, box, (640, 600))
    roll = math.degrees(math.atan2(out[1, 1] - out[0, 1], out[1, 0] - out[0, 0]))
    assert roll == pytest.approx(20.0, abs=0.5)


def test_bad_landmarks():
    with pytest.raises(ValueError):
        crop_box(np.zeros((4, 2)), 100)
    with pytest.raises(ValueError):
        crop_box(np.full((5, 2), np.nan), 100)
    with pytest.raises(ValueError):
        crop_box(np.full((5, 2), 10.0), 100)


def _rotated_projection(yaw: float, pitch: float) -> np.ndarray:
    """Orthographic view of the template from a camera at azimuth `yaw` (towards +x) and elevation
    `pitch` (below the face), looking at the origin with no roll."""
    origin = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    forward = -origin
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([250 + 100 * STANDARD_LANDMARKS_3D @ right, 250 + 100 * STANDARD_LANDMARKS_3D @ down], 1)


def test_estimate_yaw_pitch():
    y0, p0 = estimate_yaw_pitch(EMPIRICAL_LANDMARKS_512)
    assert abs(y0) < 1e-9 and abs(p0) < 1e-9
    base = estimate_yaw_pitch(_rotated_projection(0, 0))
    for yaw, pitch in [(0.3, 0.0), (-0.4, 0.0), (0.0, 0.2), (0.0, -0.25), (0.3, 0.15)]:
        y, p = estimate_yaw_pitch(_rotated_projection(yaw, pitch))
        assert y - base[0] == pytest.approx(yaw, abs=0.02)
        assert p - base[1] == pytest.approx(pitch, abs=0.03)
    y, p = estimate_yaw_pitch(_rotated_projection(1.5, 0))
    assert y == pytest.approx(math.radians(60))


def test_camera_labels():
    label = camera_label_for_crop()
    assert len(label) == 25 and all(isinstance(v, float) for v in label)
    # The frontal label is float32: the camera's x and y are 2.7·cos of float32 angles within 1.6e-7 of π/2 (π/2
    # rounded, 4.4e-8, + arccos's 1 ulp, 1.2e-7), so ≤ 4.4e-7 from 0 on any CPU (measured 1.2e-7); the rest is smaller.
    np.testing.assert_allclose(label, FRONTAL_LABEL, atol=1e-6)
    np.testing.assert_allclose(camera_label_for_crop(EMPIRICAL_LANDMARKS_512, estimate_pose=True), FRONTAL_LABEL, atol=1e-5)
    np.testing.assert_allclose(camera_label_for_crop(_rotated_projection(0.4, 0)), FRONTAL_LABEL, atol=1e-6)  # as above
    turned = camera_label_for_crop(_rotated_projection(0.4, 0), estimate_pose=True)
    assert turned[3] > 0.5  # camera moved to +x
    low = camera_label_for_crop(_rotated_projection(0.0, 0.5), estimate_pose=True)
    assert low[7] < -0.5  # camera moved below (world y down)
    # the camera's actual elevation matches the (calibration-corrected) estimate
    _, p = estimate_yaw_pitch(_rotated_projection(0.0, 0.5))
    # low[7] = 2.7·cos(arccos(1 − 2v/π)) in float32 (v = π/2·(1 + sin p), p = 0.667): v's rounding, the float32 π
    # and division (2.9e-7 in 1 − 2v/π), arccos's and cos's 1 ulp and the radius' product put sin p within 6.1e-7,
    # asin (×1/cos p = 1.27) within 7.8e-7 of p on any CPU (measured 2.5e-8)
    assert math.asin(-low[7] / 2.7) == pytest.approx(p, abs=2e-6)
    np.testing.assert_allclose(turned[16:], FRONTAL_LABEL[16:], atol=1e-6)
    R = np.array(turned[:16]).reshape(4, 4)[:3, :3]
    # float32 columns: each normalised (‖c‖² within 8 roundings of 1), `right` exactly ⟂ `forward` before its
    # normalisation (1 rounding), `up` a rounded cross product (5): ‖RᵀR − I‖_F ≤ 17 roundings, and RRᵀ − I has
    # the same eigenvalues (measured 1.1e-7 = 1.8·U32)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=20 * U32)


class _Fixed:
    def __init__(self, faces):
        self.faces = faces

    def detect(self, image, key=None):
        return self.faces


def test_align_face_with_custom_detector():
    img = textured_image(640, 480, seed=5)
    small = frontal_landmarks(500.0, 150.0, 40.0)
    big = frontal_landmarks(250.0, 250.0, 110.0)
    det = _Fixed([Face(None, 0.99, big), Face(None, 0.95, small)])
    assert isinstance(det, LandmarkDetector)
    out = align_face(img, det)
    assert len(out) == 1 and out[0].image.size == (512, 512) and out[0].score == 0.99
    np.testing.assert_array_equal(np.asarray(out[0].image), np.asarray(eg3d_crop(img, big)))
    m = 512 / crop_box(big, img.height).size  # the y-flip's half-pixel, magnified (≈ 1 here)
    offset = out[0].crop_landmarks - (TEMPLATE_LANDMARKS_512 - 0.5 + np.array([m / 2, -m / 2]))
    assert (np.abs(offset) <= truncation_slack(big, img.size)).all()  # measured ≤ 0.49, bound ≥ 0.75
    assert len(align_face(img, det, all_faces=True)) == 2
    with pytest.raises(NoFaceError):
        align_face(img, _Fixed([]), key="empty.png")


def test_file_landmarks(tmp_path):
    img = textured_image(320, 240, seed=6)
    lm = frontal_landmarks(160.0, 120.0, 60.0)
    (tmp_path / "a.txt").write_text("\n".join(f"{x} {y}" for x, y in lm) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"faces": [{"landmarks": lm.tolist(), "score": 0.97}, {"landmarks": (lm * 0.5).tolist()}]}))
    (tmp_path / "c.jpg.json").write_text(json.dumps(lm.reshape(-1).tolist()))
    (tmp_path / "bad.txt").write_text("1 2 3")
    det = FileLandmarks(tmp_path)
    np.testing.assert_allclose(det.detect(img, "photos/a.png")[0].landmarks, lm, atol=1e-9)
    faces = det.detect(img, "b.png")
    assert len(faces) == 2 and faces[0].score == 0.97
    np.testing.assert_allclose(det.detect(img, "c.jpg")[0].landmarks, lm, atol=1e-9)
    with pytest.raises(NoFaceError, match="zzz"):
        det.detect(img, "zzz.png")
    with pytest.raises(ValueError):
        det.detect(img, "bad.png")
    mapping = tmp_path / "all.json"
    mapping.write_text(json.dumps({"a.png": lm.tolist(), "d": [lm.tolist(), lm.tolist()]}))
    det2 = FileLandmarks(mapping)
    out = align_face(img, det2, key="a.png")
    np.testing.assert_array_equal(np.asarray(out[0].image), np.asarray(eg3d_crop(img, lm)))
    assert len(det2.detect(img, "d.jpg")) == 2


# ---------------------------------------------------------------- real portraits, MTCNN (offline weights)


@pytest.fixture(scope="module")
def mtcnn():
    pytest.importorskip("facenet_pytorch")
    return MTCNNDetector(device="cpu")


@pytest.fixture(scope="module")
def portraits():
    import matplotlib.cbook
    import skimage.data

    from utils.image_io import load_image

    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "hopper": load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
    }


def test_real_portraits_give_sensible_crops(mtcnn, portraits):
    for name, img in portraits.items():
        faces = align_face(img, mtcnn, key=name)
        assert len(faces) == 1 and faces[0].score > 0.99
        crop = faces[0].image
        assert crop.size == (512, 512)
        redetected = mtcnn.detect(crop)
        assert len(redetected) == 1
        dist = np.linalg.norm(redetected[0].landmarks - EMPIRICAL_LANDMARKS_512, axis=1)
        assert dist.max() < 20, (name, dist)
        # the crop's own landmarks, mapped through the chain, agree with the re-detection
        assert np.linalg.norm(faces[0].crop_landmarks - redetected[0].landmarks, axis=1).max() < 8


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_recrop_of_shipped_crops_is_near_identity(mtcnn, name):
    img = Image.open(ROOT / "test_imgs" / "input" / f"{name}.png").convert("RGB")
    assert img.size == (512, 512)
    face = mtcnn.detect(img)[0]
    box = crop_box(face.landmarks, 512)
    assert abs(512 / box.size - 1) < 0.04  # magnification
    assert math.hypot(box.center_x - 256, box.center_y - 256) < 8


def test_mtcnn_largest_face_and_confidence(mtcnn, portraits):
    a = portraits["astronaut"]
    h = portraits["hopper"].resize((300, 352), Image.BICUBIC)
    group = Image.new("RGB", (812, 512), (255, 255, 255))
    group.paste(a, (0, 0))
    group.paste(h, (512, 80))
    faces = mtcnn.detect(group)
    assert len(faces) == 2
    assert faces[0].size >= faces[1].size
    assert faces[0].landmarks[:, 0].min() > 512  # hopper's box (w+h ≈ 236 px) beats the astronaut's (≈ 196 px)
    assert all(f.score >= 0.9 for f in faces)
    assert MTCNNDetector(device="cpu", min_confidence=1.01).detect(a) == []
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert mtcnn.detect(noise) == []
    with pytest.raises(NoFaceError):
        align_face(noise, mtcnn)
    # detection on a downscaled copy for big images gives the same landmarks up to the scale
    big = a.resize((1024, 1024), Image.BICUBIC)
    lm_small = MTCNNDetector(device="cpu", max_side=512).detect(big)[0].landmarks
    lm_full = mtcnn.detect(big)[0].landmarks
    assert np.abs(lm_small - lm_full).max() < 4
