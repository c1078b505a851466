"""Render speed of the full-size TriplaneRenderer: ms per 512 view, one triplane × 3 views.

    python benchmarks/bench_render.py [--device cpu|cuda] [--threads 1 2] [--repeats 3] [--tiny] [--out FILE]

Two ways: 'batched' (one call with cameras 3×25) and 'one_by_one' (three calls with 1×25). Eval mode under
torch.inference_mode(), fp32, deterministic sampling. Uses the parity fixture's weights and triplane when the
reference folder is present (timings do not depend on the values), random ones otherwise. Reports the median
wall time after a warm-up and the process CPU time (a steadier number on a shared machine).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common import ROOT, emit, machine_info, peak_memory_mb, time_ms


def main() -> None:
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from utils.cameras import original_test_cameras
    from utils.device import keep_freed_cpu_memory, resolve_device

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny renderer (smoke test of this script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    keep_freed_cpu_memory(device)  # as the editing tools do (--keep-freed-memory, on by default)

    cfg = RendererConfig.tiny() if args.tiny else RendererConfig()
    renderer = TriplaneRenderer(cfg).eval()
    ref = Path(os.environ.get("THREEDPE_REFERENCE", str(ROOT.parent / "shared" / "reference"))) / "fixtures"
    source = "random"
    if not args.tiny and (ref / "renderer_state_dict.pt").is_file():
        renderer.load_state_dict(torch.load(ref / "renderer_state_dict.pt", weights_only=True), strict=True)
        planes = torch.load(ref / "triplane_fp16.pt", weights_only=True)["triplane"].float()
        source = "parity fixture"
    else:
        res = 32 if args.tiny else 256
        planes = torch.randn(1, 3 * cfg.plane_channels, res, res) * 2
    renderer.to(device)
    planes = planes.to(device)
    cams = original_test_cameras().to(device)
    n_views = cams.shape[0]

    results = {"machine": machine_info(device), "dtype": "float32", "weights": source, "views": n_views,
               "image_resolution": cfg.img_resolution, "neural_rendering_resolution": cfg.neural_rendering_resolution,
               "samples_per_ray": cfg.rendering.depth_resolution + cfg.rendering.depth_resolution_importance,
               "by_threads": {}}
    thread_list = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    with torch.inference_mode():
        for threads in thread_list:
            torch.set_num_threads(threads)
            batched = time_ms(lambda: renderer(planes, cams), device, args.repeats)  # warm-up fills the SR cache
            single = time_ms(lambda: [renderer(planes, cams[i:i + 1]) for i in range(n_views)], device, args.repeats)
            results["by_threads"][str(threads)] = {
                "batched_ms_per_view": round(batched["median_ms"] / n_views, 1),
                "batched_cpu_ms_per_view": round(batched["cpu_median_ms"] / n_views, 1),
                "one_by_one_ms_per_view": round(single["median_ms"] / n_views, 1),
                "one_by_one_cpu_ms_per_view": round(single["cpu_median_ms"] / n_views, 1),
                "batched_runs_ms": batched["runs_ms"], "one_by_one_runs_ms": single["runs_ms"],
            }
    results["peak_memory_mb"] = peak_memory_mb(device)
    try:
        results["load_average"] = os.getloadavg()
    except OSError:
        pass
    emit(results, args.out)


if __name__ == "__main__":
    main()
