"""Mesh extraction from a triplane: density grid → iso-level → marching cubes → binary PLY.

    grid = density_grid(lambda c: editor.sample_density(planes, c), 256, progress=True)
    level, note = choose_level(grid, None, border=30)      # 10, or Otsu's threshold when 10 is never crossed
    verts, faces = marching_cubes(grid, level, border=30)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.atomic import atomic_write

#: EG3D's shape-extraction level for the raw density sigma (trained FFHQ models cross it at the skin).
DEFAULT_LEVEL = 10.0


def density_grid(
    sample_density: Callable[[torch.Tensor], torch.Tensor],
    resolution: int = 256,
    half_extent: float = 0.5,
    chunk: int = 2**18,
    progress: bool = False,
) -> np.ndarray:
    """Evaluate sigma on a resolution³ grid over [-half_extent, half_extent]³.

    `sample_density(coords M×3) -> sigma M×1` (world units). Returns float32 array [x, y, z].
    `progress`: a tqdm bar over the chunks on stderr (256³ is 64 chunks, minutes on a CPU).
    """
    from tqdm import tqdm

    lin = torch.linspace(-half_extent, half_extent, resolution)
    xs, ys, zs = torch.meshgrid(lin, lin, lin, indexing="ij")
    coords = torch.stack([xs, ys, zs], -1).reshape(-1, 3)
    out = torch.empty(coords.shape[0])
    starts = range(0, coords.shape[0], chunk)
    for i in tqdm(starts, desc=f"density grid {resolution}³", unit="chunk", leave=False, disable=not progress):
        out[i : i + chunk] = sample_density(coords[i : i + chunk]).reshape(-1).float().cpu()
    return out.reshape(resolution, resolution, resolution).numpy()


def _interior(grid: np.ndarray, border: int) -> np.ndarray:
    """`grid` without `border` voxels at each face of the cube (all of it when border is 0)."""
    return grid[border:-border, border:-border, border:-border] if border > 0 else grid


def otsu_level(grid: np.ndarray, border: int = 0) -> float:
    """Otsu's threshold of the densities inside the trimmed box: the level that best splits them into two
    groups (empty space and matter), for a model whose density never reaches `DEFAULT_LEVEL`."""
    from skimage.filters import threshold_otsu

    values = _interior(grid, border)
    values = values[np.isfinite(values)]
    return float(threshold_otsu(values)) if values.size else float("nan")


def choose_level(grid: np.ndarray, level: float | None = None, border: int = 0) -> tuple[float, str | None]:
    """The iso-level to mesh `grid` at → (level, note or None).

    A `level` given is kept as it is. None: `DEFAULT_LEVEL` when the densities inside the trimmed box cross it,
    else Otsu's threshold of those densities (`otsu_level`), with a note that says so and why.
    """
    if level is not None:
        return float(level), None
    inner = _interior(grid, border)
    lo, hi = float(np.nanmin(inner)), float(np.nanmax(inner))
    if lo < DEFAULT_LEVEL < hi:
        return DEFAULT_LEVEL, None
    chosen = otsu_level(grid, border)
    return chosen, (f"density {lo:.3g}..{hi:.3g} never crosses the default level {DEFAULT_LEVEL:g}; "
                    f"meshed at {chosen:.3g} (Otsu's threshold of this grid)")


def marching_cubes(
    grid: np.ndarray, level: float = DEFAULT_LEVEL, half_extent: float = 0.5, border: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of `grid` at `level` → (vertices V×3 in world units, faces F×3).

    `border` voxels at each face of the cube are zeroed first (the original trims a border so
    the box walls do not become surfaces). Raises ValueError if the level is never crossed; its message
    gives the density range and a level that is (Otsu's threshold).
    """
    from skimage import measure

    g = grid.copy()
    if border > 0:
        g[:border], g[-border:] = -np.inf, -np.inf
        g[:, :border], g[:, -border:] = -np.inf, -np.inf
        g[:, :, :border], g[:, :, -border:] = -np.inf, -np.inf
        g = np.nan_to_num(g, neginf=float(np.nanmin(grid)) - 1.0)
    if not (g.min() < level < g.max()):
        inner = _interior(grid, border)
        raise ValueError(f"density never crosses level {level:g} (range {float(np.nanmin(inner)):.3g}.."
                         f"{float(np.nanmax(inner)):.3g}; choose a level inside it, e.g. "
                         f"{otsu_level(grid, border):.3g}, Otsu's threshold of this grid)")
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
