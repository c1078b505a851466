"""Sample portraits from an EG3D generator (NVIDIA's `gen_samples.py` protocol, deterministic rendering).

    python -m tools.eg3d_samples --network ffhqrebalanced512-128.pkl --seeds 11-12 --outdir out \
        [--trunc 0.7] [--trunc-cutoff 14] [--yaws -20 0 20] [--pitch 0] [--save-tensors] [--device cpu]

Per seed: z = np.random.RandomState(seed).randn(1, z_dim); ws = G.mapping(z, frontal camera, psi, cutoff);
planes from the backbone with noise mode 'const'; one render per yaw (degrees from frontal) with the
camera `look_at_cameras(π/2 + yaw, π/2 + pitch, radius, pivot, FOCAL_EG3D_LABEL)` (radius/pivot from the
generator's rendering config: 2.7, (0, 0, 0.2) for FFHQ), deterministic sampling, one camera at a time.

Writes `seed0011.png` (the 512² views side by side, uint8 = round((clamp(x,-1,1)+1)·127.5)) and, with
--save-tensors, `seed0011.safetensors` with `planes` 1×96×256×256, `image` V×3×512×512,
`image_raw` V×3×128×128, `image_depth` V×1×128×128 (views in --yaws order).
--network: an EG3D .pkl (read safely, see docs/checkpoints.md), the converted .pth, a project checkpoint,
a Hub id, or `tiny-random` (a tiny random generator, the one `datagen` builds for that name: tries the
command without weights; the pictures show no face).

Each written file is printed as it is written, then one summary line `done: N seeds written to OUTDIR/`.
Under torchrun (`torchrun --nproc_per_node=N -m tools.eg3d_samples ...`) seed i of the list goes to rank
i mod N (each rank on its own device: CUDA device LOCAL_RANK, else CPU); the files are the ones one process
writes at the same thread count, and rank 0 prints the summary of all ranks.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipelines.datagen import build_generator
from pipelines.datagen_config import TINY, SourceConfig
from utils.atomic import atomic_write_bytes
from utils.config import parse_seeds
from utils.distributed import (all_gather_object, barrier, destroy_distributed, init_ranks, is_dist, print_line,
                               rank_share)
from utils.errors import ThreeDPEError, report_user_error


def _camera_geometry(gen: nn.Module) -> tuple[float, tuple[float, float, float]]:
    rendering = gen.config.rendering
    pivot = tuple(float(v) for v in rendering.avg_camera_pivot)
    return float(rendering.avg_camera_radius), pivot  # type: ignore[return-value]


@torch.inference_mode()
def sample_seed(
    gen: nn.Module,
    seed: int,
    yaws_deg: Sequence[float] = (0.0,),
    pitch_deg: float = 0.0,
    truncation_psi: float = 0.7,
    truncation_cutoff: int | None = 14,
) -> dict[str, torch.Tensor]:
    """One seed → {'planes' 1×96×P×P, 'image' V×3×R×R, 'image_raw' V×3×r×r, 'image_depth' V×1×r×r} on CPU.

    Images are in about [-1, 1]; depth is the distance along the ray.
    """
    from utils.cameras import FOCAL_EG3D_LABEL, look_at_cameras

    device = next(gen.parameters()).device
    z_dim = int(gen.config.z_dim)
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim)).to(device=device, dtype=torch.float32)
    radius, pivot = _camera_geometry(gen)
    c_cond = look_at_cameras(math.pi / 2, math.pi / 2, radius=radius, pivot=pivot, focal=FOCAL_EG3D_LABEL).to(device)
    ws = gen.mapping(z, c_cond, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
    planes = gen.synthesize_planes(ws, noise_mode="const")
    outs: dict[str, list[torch.Tensor]] = {"image": [], "image_raw": [], "image_depth": []}
    for yaw in yaws_deg:
        cam = look_at_cameras(math.pi / 2 + math.radians(float(yaw)), math.pi / 2 + math.radians(float(pitch_deg)),
                              radius=radius, pivot=pivot, focal=FOCAL_EG3D_LABEL).to(device)
        out = gen.render_planes(planes, cam, ws, deterministic=True)
        for k in outs:
            outs[k].append(out[k].float().cpu())
    result = {k: torch.cat(v, 0).contiguous() for k, v in outs.items()}
    result["planes"] = planes.float().cpu().contiguous()
    return result


def save_seed(outdir: Path, seed: int, result: dict[str, torch.Tensor], save_tensors: bool = False) -> list[Path]:
    """Write `seedNNNN.png` (views side by side) and optionally `seedNNNN.safetensors`."""
    from utils.image_io import save_png

    outdir.mkdir(parents=True, exist_ok=True)
    images = result["image"]
    strip = torch.cat(list(images), dim=2)  # 3×R×(V·R)
    written = [save_png(outdir / f"seed{seed:04d}.png", strip)]
    if save_tensors:
        from safetensors.torch import save

        path = outdir / f"seed{seed:04d}.safetensors"
        tensors = {k: result[k].contiguous() for k in ("planes", "image", "image_raw", "image_depth")}
        atomic_write_bytes(path, save(tensors, metadata={"seed": str(seed)}))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when every seed was written, 2 on a user error (one line `error: ...` on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m tools.eg3d_samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", required=True,
                        help="EG3D .pkl, converted .pth, project checkpoint directory, a Hub id ORG/NAME[/FILE], "
                             f"or '{TINY}' (a tiny random generator: no weights needed, the pictures show no face)")
    parser.add_argument("--seeds", required=True, help="e.g. 11-12 or 0,3,5-7")
    parser.add_argument("--outdir", required=True, help="output folder")
    parser.add_argument("--trunc", type=float, default=0.7, help="truncation psi (default 0.7)")
    parser.add_argument("--trunc-cutoff", type=int, default=14, help="truncation cutoff in ws (default 14 = all)")
    parser.add_argument("--yaws", type=float, nargs="+", default=[0.0], help="yaw offsets from frontal, degrees")
    parser.add_argument("--pitch", type=float, default=0.0, help="pitch offset from frontal, degrees")
    parser.add_argument("--save-tensors", action="store_true", help="also write seedNNNN.safetensors")
    parser.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: CUDA when present)")
    args = parser.parse_args(argv)
    from utils.device import resolve_device

    ranks = None
    try:
        seeds = parse_seeds(args.seeds, what="--seeds")
        ranks = init_ranks(args.device)
        device = resolve_device(args.device) if ranks is None else ranks.device
        gen = build_generator(SourceConfig(network=args.network), device)  # the one place `tiny-random` is read
    except (ThreeDPEError, FileNotFoundError, ValueError) as e:
        if ranks is not None and ranks.owns_group:
            destroy_distributed()
        return report_user_error(e)
    try:
        return _sample_seeds(gen, seeds, args, 0 if ranks is None else ranks.rank,
                             1 if ranks is None else ranks.world_size)
    finally:
        if ranks is not None and ranks.owns_group:
            destroy_distributed()


def _sample_seeds(gen: nn.Module, seeds: list[int], args: argparse.Namespace, rank: int, world: int) -> int:
    """This rank's share of `seeds` → files, each path printed as written; then one summary line: rank 0's for
    all ranks (one process: its own), or each rank's own when the ranks have no process group."""
    outdir = Path(args.outdir)
    mine = rank_share(seeds, rank, world)
    for seed in mine:
        result = sample_seed(gen, seed, args.yaws, args.pitch, args.trunc, args.trunc_cutoff)
        for p in save_seed(outdir, seed, result, args.save_tensors):
            print_line(str(p))
    done = sum(all_gather_object(len(mine)))
    summary = f"done: {done} seeds written to {outdir}/"
    if world == 1:
        print_line(summary)
    elif is_dist() and rank == 0:
        print_line(f"{summary}, {world} processes")
    elif not is_dist():  # a rank without a process group (no MASTER_ADDR) speaks for itself
        print_line(f"{summary}, rank {rank} of {world} alone")
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
