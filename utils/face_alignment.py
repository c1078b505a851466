"""Face alignment to the EG3D "in-the-wild" 512×512 crop, from five facial landmarks.

The procedure (docs/preprocessing.md has the full account):

1. five landmarks (image-left eye, image-right eye, nose tip, image-left and image-right mouth corner),
   pixel coordinates, x right, y down;
2. flip y (y' = H − 1 − y) and fit an affine camera to the five standard 3D landmarks by least
   squares (POS): x ≈ a·P + tx, y' ≈ b·P + ty; keep only s_pos = (|a| + |b|)/2 and t = (tx, ty);
3. s = 300 / s_pos; BICUBIC-resize the whole image to int(W·s) × int(H·s);
4. crop 1024×1024 at left = int(w/2 − 512 + (tx − W/2)·s), up = int(h/2 − 512 + (H/2 − ty)·s),
   black outside the image; centre-crop 700 (offset 162); LANCZOS-resize to 512.

No rotation is applied: the crop is an axis-aligned square of side (7/3)·s_pos original pixels
centred on (tx, H − ty) (continuous coordinates), so head roll stays in the picture.
`CropBox` holds that square; it can be built from landmarks or directly from (centre, size), e.g.
after temporal smoothing in a video. The detectors that find the landmarks (`MTCNNDetector`,
`FileLandmarks`) are in utils/face_detectors.py and importable from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from utils.cameras import FOCAL_EG3D_LABEL, frontal_camera, look_at_cameras
from utils.errors import NoFaceError
from utils.face_detectors import Face, FileLandmarks, LandmarkDetector, MTCNNDetector, as_landmarks

__all__ = ["AlignedFace", "CropBox", "EMPIRICAL_LANDMARKS_512", "Face", "FileLandmarks", "LANDMARK_NAMES",
           "LandmarkDetector", "MTCNNDetector", "STANDARD_LANDMARKS_3D", "TEMPLATE_LANDMARKS_512", "align_face",
           "camera_label_for_crop", "crop_box", "crop_image", "eg3d_crop", "estimate_yaw_pitch", "look_at_angles",
           "map_points_to_crop", "pos_fit", "pos_fit_affine"]

# Five standard 3D landmarks (Deep3DFaceRecon `load_lm3d` of BFM `similarity_Lm3D_all.mat`), rows
# eyeL, eyeR, nose, mouthL, mouthR; BFM decimetres, y up, z toward the camera. The values are float32
# numbers, as in the original, used in float64 arithmetic.
STANDARD_LANDMARKS_3D: np.ndarray = np.array(
    [
        [-0.311486572, 0.290360779, 0.133779526],
        [0.309798874, 0.289720371, 0.131795257],
        [0.00325349881, -0.0461793244, 0.552442431],
        [-0.252169281, -0.381339163, 0.224057317],
        [0.248466194, -0.381282359, 0.222358690],
    ],
    dtype=np.float32,
).astype(np.float64)
STANDARD_LANDMARKS_3D.setflags(write=False)

LANDMARK_NAMES: tuple[str, ...] = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")

RESCALE_FACTOR = 300.0  # template units → pixels in the 1024 frame
TARGET_SIZE = 1024
CENTER_CROP_SIZE = 700
OUTPUT_SIZE = 512
_CENTER_OFFSET = int(TARGET_SIZE / 2 - CENTER_CROP_SIZE / 2)  # 162

# Template points in the 512 crop for an ideal frontal face (continuous coordinates, eg3d_crop.md §3).
TEMPLATE_PX_PER_UNIT = RESCALE_FACTOR * OUTPUT_SIZE / CENTER_CROP_SIZE  # 219.4286
TEMPLATE_LANDMARKS_512: np.ndarray = np.stack(
    [256.0 + TEMPLATE_PX_PER_UNIT * STANDARD_LANDMARKS_3D[:, 0], 256.0 - TEMPLATE_PX_PER_UNIT * STANDARD_LANDMARKS_3D[:, 1]],
    axis=1,
)
# Mean facenet-pytorch MTCNN landmarks on eight EG3D-cropped portraits (eg3d_crop.md §3), pixel coordinates.
EMPIRICAL_LANDMARKS_512: np.ndarray = np.array(
    [[190.65, 202.12], [325.50, 201.93], [256.29, 283.83], [192.83, 340.62], [317.06, 339.40]], dtype=np.float64
)

# Above this many pixels for the whole-image resize, only the needed region is resampled (same numbers
# up to the rare ±1 rounding of PIL's fixed-point filter taps).
_MAX_FULL_RESIZE_PIXELS = 36_000_000


# --------------------------------------------------------------------------------------------------
# POS fit and the crop box
# --------------------------------------------------------------------------------------------------


def pos_fit_affine(landmarks: Any, image_height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares affine camera from the standard 3D landmarks to the image (y flipped to point up).

    Args:
        landmarks: 5×2 pixel coordinates, x right, y down, order eyeL, eyeR, nose, mouthL, mouthR.
        image_height: H of the image the landmarks live in.
    Returns:
        (a, b, t): a, b the 3-vectors of the x and y' rows, t = (tx, ty) where the template origin
        projects, in the y-up frame y' = H − 1 − y.
    """
    lm = as_landmarks(landmarks)
    x = lm[:, 0]
    y_up = (image_height - 1) - lm[:, 1]
    design = np.concatenate([STANDARD_LANDMARKS_3D, np.ones((5, 1))], axis=1)  # 5×4
    # Two independent 4-parameter fits (the original stacks them into one 10×8 system; same solution).
    kx = np.linalg.lstsq(design, x, rcond=None)[0]
    ky = np.linalg.lstsq(design, y_up, rcond=None)[0]
    return kx[:3], ky[:3], np.array([kx[3], ky[3]])


def pos_fit(landmarks: Any, image_height: int) -> tuple[float, np.ndarray]:
    """EG3D/Deep3DFaceRecon POS fit: scale and translation only.

    Args:
        landmarks: 5×2 pixel coordinates (x right, y down), order eyeL, eyeR, nose, mouthL, mouthR.
        image_height: H of the image.
    Returns:
        (s_pos, t): s_pos = (|a| + |b|)/2 in image pixels per template unit; t = (tx, ty), the template
        origin in the y-up frame y' = H − 1 − y (float64 array of shape (2,)).
    """
    a, b, t = pos_fit_affine(landmarks, image_height)
    return float((np.linalg.norm(a) + np.linalg.norm(b)) / 2.0), t


@dataclass(frozen=True)
class CropBox:
    """The EG3D crop as one axis-aligned square in the original image.

    center_x, center_y: box centre in continuous pixel coordinates (pixel index c spans [c, c+1)),
    y down; size: side length in original pixels (= (7/3)·s_pos). `crop_image` turns the box back
    into the exact EG3D chain, so a box from `crop_box` reproduces EG3D bit for bit, and a smoothed
    or hand-made box crops consistently.
    """

    center_x: float
    center_y: float
    size: float

    @property
    def s_pos(self) -> float:
        return self.size * RESCALE_FACTOR / CENTER_CROP_SIZE

    @classmethod
    def from_pos(cls, s_pos: float, t: Sequence[float], image_height: int) -> "CropBox":
        """Box from a POS fit (s_pos, t = (tx, ty) in the y-up frame of an image of height `image_height`)."""
        return cls(float(t[0]), float(image_height - float(t[1])), float(s_pos) * CENTER_CROP_SIZE / RESCALE_FACTOR)

    def to_pos(self, image_height: int) -> tuple[float, np.ndarray]:
        """Inverse of `from_pos`: (s_pos, t)."""
        return self.s_pos, np.array([self.center_x, image_height - self.center_y])

    def corners(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in continuous coordinates."""
        h = self.size / 2
        return (self.center_x - h, self.center_y - h, self.center_x + h, self.center_y + h)


def crop_box(landmarks: Any, image_height: int) -> CropBox:
    """The EG3D crop box for `landmarks` (5×2, x right, y down) in an image of height `image_height`."""
    s_pos, t = pos_fit(landmarks, image_height)
    if not s_pos > 1e-6:
        raise ValueError("degenerate landmarks: the fitted face scale is zero")
    return CropBox.from_pos(s_pos, t, image_height)


@dataclass(frozen=True)
class _CropGeometry:
    s: float  # resize factor of the whole image
    w: int  # resized width, int(W0·s)
    h: int
    left: int  # 1024 crop offsets in the resized image
    up: int


def _geometry(box: CropBox, width: int, height: int) -> _CropGeometry:
    s_pos, t = box.to_pos(height)
    s = RESCALE_FACTOR / s_pos
    w = int(width * s)
    h = int(height * s)
    left = int(w / 2 - TARGET_SIZE / 2 + (t[0] - width / 2) * s)
    up = int(h / 2 - TARGET_SIZE / 2 + (height / 2 - t[1]) * s)
    return _CropGeometry(s, w, h, left, up)


def _resized_region(image: Image.Image, g: _CropGeometry, x0: int, y0: int, size: int) -> Image.Image:
    """Pixels [x0, x0+size) × [y0, y0+size) of `image` BICUBIC-resized to g.w × g.h, black outside."""
    out = Image.new("RGB", (size, size), (0, 0, 0))
    if g.w < 1 or g.h < 1:
        return out
    if g.w * g.h <= _MAX_FULL_RESIZE_PIXELS:
        resized = image.resize((g.w, g.h), resample=Image.BICUBIC)
        return resized.crop((x0, y0, x0 + size, y0 + size))
    # Large upscales: resample only the visible part (PIL's `box` keeps the filter geometry of the
    # full resize: output pixel i samples source (i + 0.5)·W0/w).
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + size, g.w), min(y0 + size, g.h)
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    sx, sy = image.width / g.w, image.height / g.h
    region = image.resize(
        (ix1 - ix0, iy1 - iy0), resample=Image.BICUBIC, box=(ix0 * sx, iy0 * sy, ix1 * sx, iy1 * sy)
    )
    out.paste(region, (ix0 - x0, iy0 - y0))
    return out


def crop_image(image: Image.Image, box: CropBox, output_size: int = OUTPUT_SIZE) -> Image.Image:
    """Apply the EG3D crop chain for `box` to `image` (any size, converted to RGB).

    Returns:
        RGB PIL image output_size × output_size (512 in EG3D; other sizes resize the 700 crop with
        LANCZOS to that size instead).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    g = _geometry(box, image.width, image.height)
    crop700 = _resized_region(image, g, g.left + _CENTER_OFFSET, g.up + _CENTER_OFFSET, CENTER_CROP_SIZE)
    return crop700.resize((output_size, output_size), resample=Image.LANCZOS)


def eg3d_crop(image: Image.Image, landmarks: Any, output_size: int = OUTPUT_SIZE) -> Image.Image:
    """EG3D's in-the-wild crop of `image` from its 5 landmarks (5×2, x right, y down) → RGB 512×512 PIL image."""
    return crop_image(image, crop_box(landmarks, image.height), output_size)


def map_points_to_crop(
    points: Any, box: CropBox, image_size: tuple[int, int], output_size: int = OUTPUT_SIZE
) -> np.ndarray:
    """Pixel-index coordinates in the original image (N×2, x right, y down) → pixel-index coordinates
    in the crop, following the exact chain (truncations included). `image_size` = (W, H)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    width, height = image_size
    g = _geometry(box, width, height)
    k = output_size / CENTER_CROP_SIZE
    u = k * ((g.w / width) * (pts[:, 0] + 0.5) - g.left - _CENTER_OFFSET) - 0.5
    v = k * ((g.h / height) * (pts[:, 1] + 0.5) - g.up - _CENTER_OFFSET) - 0.5
    return np.stack([u, v], axis=1)


# --------------------------------------------------------------------------------------------------
# Pose and camera label
# --------------------------------------------------------------------------------------------------


def _raw_yaw_pitch(landmarks: Any) -> tuple[float, float]:
    a, b, _ = pos_fit_affine(landmarks, 0)
    # Camera at yaw δ (towards +x) sees image-right = (cos δ, 0, −sin δ); at pitch ε (camera below the
    # face) image-up = (0, cos ε, sin ε): read both angles off the affine rows.
    yaw = math.atan2(-a[2], math.hypot(a[0], a[1]))
    pitch = math.atan2(b[2], math.hypot(b[0], b[1]))
    return yaw, pitch


# MTCNN's points are not the template's 68-point definitions (its nose sits lower, its eyes too), so
# the raw angles of a frontal face are not zero. Zero is set at the mean MTCNN landmarks of EG3D's
# crops (eg3d_crop.md §3), i.e. "as frontal as the average EG3D crop".
_YAW_ZERO, _PITCH_ZERO = _raw_yaw_pitch(EMPIRICAL_LANDMARKS_512)


def estimate_yaw_pitch(landmarks: Any, max_yaw_deg: float = 60.0, max_pitch_deg: float = 40.0) -> tuple[float, float]:
    """Rough head pose from 5 landmarks: the camera's geometric azimuth and elevation offsets, in radians.

    yaw > 0: the camera moves to the face's +x side (the nose then appears left of the eye midline);
    pitch > 0: the camera moves below the face. Orthographic, read off the affine POS rows, zeroed at
    the mean MTCNN landmarks of EG3D crops, clamped to ±max_yaw_deg / ±max_pitch_deg. Expect errors
    of 10° or more: it is meant for a camera label better than frontal on clearly turned heads.
    `camera_label_for_crop` converts these angles to EG3D's LookAtPoseSampler arguments.
    """
    yaw, pitch = _raw_yaw_pitch(landmarks)
    yaw -= _YAW_ZERO
    pitch -= _PITCH_ZERO
    my, mp = math.radians(max_yaw_deg), math.radians(max_pitch_deg)
    return float(min(max(yaw, -my), my)), float(min(max(pitch, -mp), mp))


def look_at_angles(yaw: float, pitch: float) -> tuple[float, float]:
    """Geometric camera offsets (radians) → EG3D LookAtPoseSampler (horizontal, vertical) arguments.

    The sampler puts the camera at polar angle arccos(1 − 2·vertical/π) from +y, so an elevation e
    below the horizon needs vertical = π/2·(1 + sin e); horizontal is the azimuth, π/2 + yaw.
    """
    return math.pi / 2 + yaw, math.pi / 2 * (1.0 + math.sin(pitch))


def _to_label(camera: torch.Tensor) -> list[float]:
    """A 1×25 float32 camera → 25 floats, each the shortest decimal that round-trips in float32 (4.2647 and
    2.7 stay readable in dataset.json)."""
    return [float(str(v)) for v in camera.detach().cpu().reshape(-1).numpy()]


def camera_label_for_crop(landmarks: Any = None, estimate_pose: bool = False) -> list[float]:
    """Camera label (25 floats: cam2world 4×4 row-major ++ normalised intrinsics 3×3) for an EG3D crop.

    Frontal by default: camera at (0, 0, 2.7) looking along −z, fx = fy = 4.2647, cx = cy = 0.5
    (`utils.cameras.frontal_camera`). With `estimate_pose` and landmarks (5×2, of the original image
    or of the crop), the camera is placed at the rough pose of `estimate_yaw_pitch` with EG3D's
    look-at sampler (radius 2.7, look-at (0, 0, 0.2)).
    """
    if estimate_pose and landmarks is not None:
        horizontal, vertical = look_at_angles(*estimate_yaw_pitch(landmarks))
        return _to_label(look_at_cameras(horizontal, vertical, radius=2.7, pivot=(0.0, 0.0, 0.2), focal=FOCAL_EG3D_LABEL))
    return _to_label(frontal_camera(FOCAL_EG3D_LABEL))


# --------------------------------------------------------------------------------------------------
# The one call
# --------------------------------------------------------------------------------------------------


@dataclass
class AlignedFace:
    """An aligned face: image (RGB PIL, 512×512), label (25 floats), landmarks (5×2, in the original
    image), score, box (CropBox in the original image), crop_landmarks (5×2, pixel index in the crop)."""

    image: Image.Image
    label: list[float]
    landmarks: np.ndarray
    score: float
    box: CropBox
    crop_landmarks: np.ndarray = field(default_factory=lambda: np.zeros((5, 2)))


def align_face(
    image: Image.Image,
    detector: LandmarkDetector,
    all_faces: bool = False,
    key: str | None = None,
    estimate_pose: bool = False,
    output_size: int = OUTPUT_SIZE,
) -> list[AlignedFace]:
    """Detect, crop and label the main face (or, with all_faces, every face, main first).

    Args:
        image: RGB PIL image, already upright (see utils.image_io.load_image).
        detector: a LandmarkDetector (MTCNNDetector, FileLandmarks, ...).
        key: the image's file name, passed to the detector.
    Raises:
        NoFaceError: the detector found no face.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    faces = detector.detect(image, key=key)
    if not faces:
        raise NoFaceError(f"no face found in {key or 'the image'} (no detection with enough confidence)")
    out = []
    for face in faces if all_faces else faces[:1]:
        box = crop_box(face.landmarks, image.height)
        crop = crop_image(image, box, output_size)
        crop_lm = map_points_to_crop(face.landmarks, box, image.size, output_size)
        label = camera_label_for_crop(face.landmarks, estimate_pose=estimate_pose)
        out.append(AlignedFace(crop, label, face.landmarks, face.score, box, crop_lm))
    return out

