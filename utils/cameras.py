"""Cameras as N×25 vectors: cam2world 4×4 row-major (OpenCV axes) ++ normalised intrinsics 3×3 row-major.

World: +y up, the face looks toward +z, the frontal camera sits on +z. Camera (OpenCV): x right, y down,
z forward. Angles follow EG3D's LookAtPoseSampler: yaw (horizontal) = pitch (vertical polar angle from +y)
= π/2 is frontal; the camera lies on a sphere of `radius` around the WORLD ORIGIN and looks at `pivot`.

Two focal lengths are in use (normalised by image width):
- `FOCAL_EG3D_LABEL` = 2985.29/700 = 4.2647: the FFHQ dataset labels and EG3D's own sampling scripts.
- `FOCAL_3DPE` = 1/(tan(18.837·3.14159/360)·1.414) = 4.26339: the original 3DPE/Live3D test, video and
  training cameras (3.14159 and 1.414 are the original's truncated constants, kept on purpose).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "FOCAL_EG3D_LABEL",
    "FOCAL_3DPE",
    "FOV_3DPE_DEG",
    "fov_to_focal_3dpe",
    "intrinsics",
    "create_cam2world_matrix",
    "look_at_cameras",
    "frontal_camera",
    "original_test_cameras",
    "sample_training_cameras",
    "orbit_cameras",
    "parse_camera_label",
]

FOV_3DPE_DEG = 18.837
FOCAL_EG3D_LABEL = 4.2647


def fov_to_focal_3dpe(fov_deg: float | torch.Tensor) -> float | torch.Tensor:
    """The original's FOV → normalised focal: 1 / (tan(fov·3.14159/360) · 1.414)."""
    if isinstance(fov_deg, torch.Tensor):
        return 1.0 / (torch.tan(fov_deg * 3.14159 / 360) * 1.414)
    return 1.0 / (math.tan(fov_deg * 3.14159 / 360) * 1.414)


FOCAL_3DPE = fov_to_focal_3dpe(FOV_3DPE_DEG)


def intrinsics(focal: float | torch.Tensor, cx: float | torch.Tensor = 0.5, cy: float | torch.Tensor = 0.5,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised intrinsics [[f,0,cx],[0,f,cy],[0,0,1]]: 3×3 for scalars, N×3×3 if any argument is a 1-D tensor."""
    f, cx, cy = (torch.as_tensor(v, dtype=dtype) for v in (focal, cx, cy))
    f, cx, cy = torch.broadcast_tensors(f, cx, cy)
    zero, one = torch.zeros_like(f), torch.ones_like(f)
    k = torch.stack([f, zero, cx, zero, f, cy, zero, zero, one], dim=-1)
    return k.reshape(*f.shape, 3, 3)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True)


def create_cam2world_matrix(forward: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """OpenCV cam2world from viewing directions `forward` [N, 3] and camera positions `origin` [N, 3] → [N, 4, 4].

    right = -normalize(cross(world_up, forward)), up = normalize(cross(forward, right)), columns [right, up, forward].
    """
    forward = _normalize(forward)
    up_world = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype, device=forward.device).expand_as(forward)
    right = -_normalize(torch.cross(up_world, forward, dim=-1))
    up = _normalize(torch.cross(forward, right, dim=-1))
    n = forward.shape[0]
    rot = torch.eye(4, dtype=forward.dtype, device=forward.device).unsqueeze(0).repeat(n, 1, 1)
    rot[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    trans = torch.eye(4, dtype=forward.dtype, device=forward.device).unsqueeze(0).repeat(n, 1, 1)
    trans[:, :3, 3] = origin
    return trans @ rot


def _as_1d(x: float | Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype).reshape(-1)


def look_at_cameras(
    yaw: float | Sequence[float] | torch.Tensor,
    pitch: float | Sequence[float] | torch.Tensor,
    radius: float = 2.7,
    pivot: Sequence[float] = (0.0, 0.0, 0.2),
    focal: float | torch.Tensor = FOCAL_EG3D_LABEL,
    cx: float | torch.Tensor = 0.5,
    cy: float | torch.Tensor = 0.5,
) -> torch.Tensor:
    """EG3D LookAtPoseSampler cameras → [N, 25] float32 (yaw = pitch = π/2 is frontal).

    yaw/pitch: scalars or 1-D (broadcast against each other). phi = arccos(1 - 2·clamp(pitch, 1e-5, π-1e-5)/π);
    origin = r·(sinφ·cos(π-yaw), cosφ, sinφ·sin(π-yaw)). Computed in float32 like the original.
    """
    dtype = torch.float32
    h, v = torch.broadcast_tensors(_as_1d(yaw, dtype), _as_1d(pitch, dtype))
    theta = h
    v = torch.clamp(v, 1e-5, math.pi - 1e-5)
    phi = torch.arccos(1 - 2 * (v / math.pi))
    origin = torch.zeros((h.shape[0], 3), dtype=dtype)
    origin[:, 0] = radius * torch.sin(phi) * torch.cos(math.pi - theta)
    origin[:, 2] = radius * torch.sin(phi) * torch.sin(math.pi - theta)
    origin[:, 1] = radius * torch.cos(phi)
    lookat = torch.as_tensor(pivot, dtype=dtype).reshape(1, 3)
    forward = _normalize(lookat - origin)
    c2w = create_cam2world_matrix(forward, origin)
    k = intrinsics(focal, cx, cy, dtype=dtype)
    k = k.reshape(-1, 9).expand(h.shape[0], 9) if k.ndim == 2 else k.reshape(-1, 9)
    return torch.cat([c2w.reshape(-1, 16), k], dim=1)


def frontal_camera(focal: float = FOCAL_EG3D_LABEL) -> torch.Tensor:
    """The frontal camera (0, 0, 2.7) looking at (0, 0, 0.2) → [1, 25]."""
    return look_at_cameras(math.pi / 2, math.pi / 2, focal=focal)


def original_test_cameras(yaws_deg: Sequence[float] = (-30.0, 0.0, 30.0), pitch_deg: float = 0.0) -> torch.Tensor:
    """The original 3DPE test views (yaw π/2 + yaw, pitch π/2 + pitch, radius 2.7, pivot (0,0,0.2), FOCAL_3DPE) → [V, 25].

    The default reproduces the 3 parity-fixture cameras (the original's yaws are np.linspace(-π/6, π/6, 3)).
    """
    yaws = [math.pi / 2 + math.radians(d) for d in yaws_deg]
    if tuple(yaws_deg) == (-30.0, 0.0, 30.0):
        yaws = [math.pi / 2 + d for d in (-math.pi / 6, 0.0, math.pi / 6)]
    pitch = math.pi / 2 + math.radians(pitch_deg)
    return look_at_cameras(torch.tensor(yaws, dtype=torch.float64), pitch, focal=FOCAL_3DPE)


def sample_training_cameras(
    n: int,
    generator: torch.Generator | None = None,
    pitch_range_deg: float = 26.0,
    yaw_range_deg: float = 49.0,
    fov_deg: float = FOV_3DPE_DEG,
    fov_range_deg: float = 2.4,
    cxy_range: float = 0.1,
    radius: float = 2.7,
    pivot: Sequence[float] = (0.0, 0.0, 0.2),
) -> torch.Tensor:
    """n random training cameras [n, 25], uniform per sample in pitch π/2 ± 26°, yaw π/2 ± 49°, fov 18.837 ± 2.4°
    (focal by the original's formula), cx, cy 0.5 ± 0.1. (The original drew one camera for the whole batch; call
    with n=1 and expand for that behaviour.)"""
    u = torch.rand((n, 5), generator=generator, dtype=torch.float64) * 2 - 1
    pitch = math.pi / 2 + u[:, 0] * math.radians(pitch_range_deg)
    yaw = math.pi / 2 + u[:, 1] * math.radians(yaw_range_deg)
    fov = fov_deg + u[:, 2] * fov_range_deg
    focal = fov_to_focal_3dpe(fov).to(torch.float32)
    cx = (0.5 + u[:, 3] * cxy_range).to(torch.float32)
    cy = (0.5 + u[:, 4] * cxy_range).to(torch.float32)
    return look_at_cameras(yaw, pitch, radius=radius, pivot=pivot, focal=focal, cx=cx, cy=cy)


def orbit_cameras(n_frames: int = 288, pitch_amplitude: float = 0.25, yaw_amplitude: float = 0.35,
                  focal: float = FOCAL_3DPE) -> torch.Tensor:
    """The original video path → [n_frames, 25]: pitch = 3.14/2 − 0.05 + 0.25·cos(2·3.14·t/n),
    yaw = 3.14/2 + 0.35·sin(2·3.14·t/n) (the original's truncated 3.14 kept)."""
    t = torch.arange(n_frames, dtype=torch.float64)
    pitch = 3.14 / 2 - 0.05 + pitch_amplitude * torch.cos(2 * 3.14 * t / n_frames)
    yaw = 3.14 / 2 + yaw_amplitude * torch.sin(2 * 3.14 * t / n_frames)
    return look_at_cameras(yaw, pitch, focal=focal)


def parse_camera_label(label: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A dataset.json label (25 floats) → float32 tensor [25]; raises ValueError on a wrong length."""
    t = torch.as_tensor(label, dtype=torch.float32).reshape(-1)
    if t.numel() != 25:
        raise ValueError(f"a camera label has 25 numbers (16 cam2world + 9 intrinsics), got {t.numel()}")
    return t
