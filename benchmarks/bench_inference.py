"""Inference speed: ms per edit (encoder, cached reference), per 512 view, per edit + 3 views (images written).

    python benchmarks/bench_inference.py [--device cpu|cuda] [--precision fp32 bf16] [--repeats 5] [--out FILE]
    python benchmarks/bench_inference.py --device cpu --precision fp32 bf16 --repeats 1   # quickest full-size run
    python benchmarks/bench_inference.py --device cpu --precision fp32 --compile          # eager beside compiled

Full-size models with random weights (the timings do not depend on the values). With bf16 it also
reports the PSNR of bf16 views against fp32 views of the same weights, and on CPU whether the processor has
bf16 instructions (`cpu_bf16_flags`: avx512_bf16, amx_bf16; without them oneDNN emulates bf16, slowly).
Each timing is one warm-up call then `--repeats` calls; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from common import emit, machine_info, peak_memory_mb, reset_peak_memory, sync, time_ms


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1,1] (peak-to-peak 2)."""
    mse = torch.mean((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction sets named in /proc/cpuinfo (avx512_bf16, amx_bf16); [] elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def write_views(editor, image: torch.Tensor, prompt, cameras: torch.Tensor, out_dir: Path) -> None:
    """The whole job of one input: edit, render the views, write them as PNGs."""
    from utils.image_io import save_png, tensor_to_uint8

    views = editor.render(editor.edit(image, prompt), cameras)["image"]
    for i, v in enumerate(views):
        save_png(out_dir / f"view{i}.png", tensor_to_uint8(v))


def main() -> None:
    from pipelines.editor import PortraitEditor
    from utils.cameras import original_test_cameras
    from utils.device import keep_freed_cpu_memory, resolve_device
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the compiled editor (`PortraitEditor.compile`) beside eager: compile time, edit "
                         "+ 1 view, edit + 3 views written, and its largest difference from eager")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    keep_freed_cpu_memory(device)  # as the editing tools do (--keep-freed-memory, on by default)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    res = 64 if args.tiny else 512
    image = torch.rand(1, 3, res, res, generator=gen) * 2 - 1
    reference = torch.rand(1, 3, res, res, generator=gen) * 2 - 1
    cameras = original_test_cameras((-30.0, 0.0, 30.0), 0.0)
    result: dict = {"benchmark": "inference", "machine": machine_info(device), "batch": 1, "views": 3, "results": {}}
    if device.type == "cpu":
        result["machine"]["cpu_bf16_flags"] = cpu_bf16_flags()
    base_views = None
    for precision in args.precision:
        editor = PortraitEditor.random_init(kind="edit", tiny=args.tiny, seed=0, device=device, precision=precision)
        prompt = editor.encode_prompt(reference=reference)
        out_dir = Path(tempfile.mkdtemp())
        reset_peak_memory(device)

        def edit():
            return editor.edit(image, prompt)

        planes = edit()
        one_view = cameras[1:2]

        timed = {
            "prompt_encode": lambda: editor.encode_prompt(reference=reference),
            "edit": edit,
            "view_single": lambda: editor.render(planes, one_view),
            "views_3_batched": lambda: editor.render(planes, cameras),
            "edit_plus_3_views_written": lambda: write_views(editor, image, prompt, cameras, out_dir),
            "edit_plus_1_view": lambda: editor.render(editor.edit(image, prompt), one_view),
        }
        entry: dict = {"dtype": precision}
        for name in tqdm(timed, desc=precision, unit="timing"):
            entry[name] = time_ms(timed[name], device, args.repeats)
        entry["per_view_ms_batched"] = round(entry["views_3_batched"]["median_ms"] / 3, 2)
        entry["peak_memory_mb"] = peak_memory_mb(device)
        views = editor.render(planes, cameras)["image"]
        if precision == "fp32":
            base_views = views
        elif base_views is not None:
            entry["psnr_vs_fp32_db"] = round(psnr(views, base_views), 2)
        if args.compile:
            entry["compiled"] = compiled_timings(editor, image, prompt, cameras, views, device, args.repeats, out_dir)
        result["results"][precision] = entry
    emit(result, args.out)


def compiled_timings(editor, image: torch.Tensor, prompt, cameras: torch.Tensor, eager_views: torch.Tensor,
                     device: torch.device, repeats: int, out_dir: Path) -> dict:
    """The same editor compiled in place (`--compile`): the first call's time (compilation included), then the
    medians of edit + 1 view and edit + 3 views written, and the largest |Δ| of its 3 views against eager's."""
    import time

    editor.compile()
    one_view = cameras[1:2]
    t0 = time.perf_counter()
    editor.render(editor.edit(image, prompt), one_view)
    sync(device)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    views = editor.render(editor.edit(image, prompt), cameras)["image"]  # 3 views: a second shape, compiled once more
    sync(device)
    second_shape_s = time.perf_counter() - t0
    return {
        "first_call_s_1_view": round(first_s, 1),
        "first_call_s_3_views": round(second_shape_s, 1),
        "edit_plus_1_view": time_ms(lambda: editor.render(editor.edit(image, prompt), one_view), device, repeats),
        "edit_plus_3_views_written": time_ms(lambda: write_views(editor, image, prompt, cameras, out_dir), device,
                                             repeats),
        "max_abs_diff_vs_eager": float((views - eager_views).abs().max()),
    }


if __name__ == "__main__":
    main()
