"""Mesh extraction from a triplane: density grid → marching cubes → binary PLY."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.atomic import atomic_write


def density_grid(
    sample_density: Callable[[torch.Tensor], torch.Tensor],
    resolution: int = 256,
    half_extent: float = 0.5,
    chunk: int = 2**18,
) -> np.ndarray:
    """Evaluate sigma on a resolution³ grid over [-half_extent, half_extent]³.

    `sample_density(coords M×3) -> sigma M×1` (world units). Returns float32 array [x, y, z].
    """
    lin = torch.linspace(-half_extent, half_extent, resolution)
    xs, ys, zs = torch.meshgrid(lin, lin, lin, indexing="ij")
    coords = torch.stack([xs, ys, zs], -1).reshape(-1, 3)
    out = torch.empty(coords.shape[0])
    for i in range(0, coords.shape[0], chunk):
        out[i : i + chunk] = sample_density(coords[i : i + chunk]).reshape(-1).float().cpu()
    return out.reshape(resolution, resolution, resolution).numpy()


def marching_cubes(
    grid: np.ndarray, level: float = 10.0, half_extent: float = 0.5, border: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of `grid` at `level` → (vertices V×3 in world units, faces F×3).

    `border` voxels at each face of the cube are zeroed first (the original trims a border so
    the box walls do not become surfaces). Raises ValueError if the level is never crossed.
    """
    from skimage import measure

    g = grid.copy()
    if border > 0:
        g[:border], g[-border:] = -np.inf, -np.inf
        g[:, :border], g[:, -border:] = -np.inf, -np.inf
        g[:, :, :border], g[:, :, -border:] = -np.inf, -np.inf
        g = np.nan_to_num(g, neginf=float(np.nanmin(grid)) - 1.0)
    if not (g.min() < level < g.max()):
        raise ValueError(f"density never crosses level {level} (range {g.min():.3g}..{g.max():.3g})")
    n = grid.shape[0]
    spacing = (2 * half_extent / (n - 1),) * 3
    verts, faces, _, _ = measure.marching_cubes(g, level=level, spacing=spacing)
    verts = verts - half_extent
    return verts.astype(np.float32), faces.astype(np.int32)


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a binary little-endian PLY atomically (temp name + rename)."""
    path = Path(path)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode()
    face_rec = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face_rec["n"] = 3
    face_rec["idx"] = faces
    with atomic_write(path, "wb") as f:
        f.write(header)
        f.write(np.asarray(vertices, dtype="<f4").tobytes())
        f.write(face_rec.tobytes())


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read back a PLY written by `write_ply` → (vertices, faces)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode().splitlines()
    nv = int(next(l for l in header if l.startswith("element vertex")).split()[-1])
    nf = int(next(l for l in header if l.startswith("element face")).split()[-1])
    verts = np.frombuffer(data, dtype="<f4", count=nv * 3, offset=end).reshape(nv, 3)
    rec = np.frombuffer(data, dtype=[("n", "u1"), ("idx", "<i4", (3,))], count=nf, offset=end + nv * 12)
    return verts.copy(), rec["idx"].copy()
