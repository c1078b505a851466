"""Video editing throughput and temporal stability (tools.edit_video on an in-memory synthetic clip).

    python benchmarks/bench_video.py [--device cpu|cuda] [--frames 6] [--batch-size 1 4] [--out FILE]
    python benchmarks/bench_video.py --checkpoint pretrained_models/3dpe.pt   # real weights: stability is meaningful

Frames: the skimage astronaut portrait panned sideways (up to ~5 px per frame; source `--source-size`², a face in every
frame). Per frame: MTCNN detection + EG3D crop (smoothed), edit (prompt embedding computed once),
render one 512 view at the frontal camera, H.264 encoding. Reports frames per second end to end and
the time per frame of each stage, and the temporal stability figures of the summary (mean |Δ| between
consecutive frames, uint8 levels, output vs aligned input). With random weights the output is nearly
constant, so only the input side (crop jitter, with and without smoothing) means something.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import emit, machine_info, peak_memory_mb, reset_peak_memory, sync


def synthetic_frames(n: int, size: int, amplitude: float = 30.0, period: int = 40) -> list[np.ndarray]:
    """n frames size×size×3 uint8 of the astronaut portrait panned sideways (sine, ±amplitude source px)."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut())
    cx, cy, half = 225, 150, 170
    out = []
    for i in range(n):
        dx = round(amplitude * math.sin(2 * math.pi * i / period))
        box = (cx - half + dx, cy - half, cx + half + dx, cy + half)
        out.append(np.asarray(img.crop(box).resize((size, size), Image.BICUBIC)))
    return out


class _Timed:
    """Wraps a callable, accumulating wall time (synchronised on CUDA)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds, self.calls = fn, device, 0.0, 0

    def __call__(self, *a, **k):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def crop_jitter(frames: list[np.ndarray], detector, radius: int, side: int = 256) -> float:
    """Mean |Δ| (uint8 levels) between consecutive aligned crops, with centred-window smoothing ±radius."""
    from PIL import Image

    from pipelines.crop_tracking import CentredWindowSmoother, FrameTrack
    from utils.face_alignment import crop_box, crop_image

    sm = CentredWindowSmoother(radius)
    tracks = []
    for i, f in enumerate(frames):
        faces = detector.detect(Image.fromarray(f))
        box = crop_box(faces[0].landmarks, f.shape[0]) if faces else None
        tracks.extend(sm.push(FrameTrack(i, f, box)))
    tracks.extend(sm.flush())
    crops = [np.asarray(crop_image(Image.fromarray(t.frame), t.box, side), dtype=np.int16)
             for t in tracks if t.box is not None]
    return round(float(np.mean([np.abs(a - b).mean() for a, b in zip(crops, crops[1:])])), 3)


def main() -> None:
    from pipelines import video_edit as ev
    from pipelines.editor import PortraitEditor
    from utils.device import keep_freed_cpu_memory, resolve_device
    from utils.face_alignment import MTCNNDetector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--frames", type=int, default=None, help="frames per run (default 6 on CPU, 48 on GPU)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--source-size", type=int, default=480)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--checkpoint", default=None, help="real weights (default: full-size random weights)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    keep_freed_cpu_memory(device)  # as the editing tools do (--keep-freed-memory, on by default)
    n = args.frames or (48 if device.type == "cuda" else 6)

    if args.checkpoint:
        editor = PortraitEditor.from_pretrained(args.checkpoint, device=device, precision=args.precision)
    else:
        editor = PortraitEditor.random_init(tiny=args.tiny, seed=0, device=device, precision=args.precision)
    res = 64 if args.tiny else editor.input_resolution
    detector = MTCNNDetector(device=device)
    frames = synthetic_frames(n, args.source_size)
    gen = torch.Generator().manual_seed(0)
    prompt = editor.encode_prompt(reference=torch.rand(1, 3, res, res, generator=gen) * 2 - 1)

    detect = _Timed(detector.detect, device)
    detector.detect = detect
    edit, render = _Timed(editor.edit, device), _Timed(editor.render, device)
    editor.edit, editor.render = edit, render

    result: dict = {
        "benchmark": "video", "machine": machine_info(device), "precision": args.precision,
        "weights": args.checkpoint or ("random-tiny" if args.tiny else "random-full"),
        "frames": n, "source_size": args.source_size, "input_size": res, "views_per_frame": 1, "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (imports, MTCNN, allocator)
        ev.edit_video("warmup", Path(tmp) / "w.mp4", editor, prompt, detector,
                      ev.VideoEditConfig(batch_size=1, input_size=res, smooth_radius=1), progress=False,
                      frames=iter(frames[:2]), fps=30.0)
        for bs in args.batch_size:
            for t in (detect, edit, render):
                t.seconds, t.calls = 0.0, 0
            reset_peak_memory(device)
            cfg = ev.VideoEditConfig(batch_size=bs, input_size=res)
            s = ev.edit_video("synthetic", Path(tmp) / f"b{bs}.mp4", editor, prompt, detector, cfg, progress=False,
                              frames=iter(frames), fps=30.0)
            per = lambda t: round(1000 * t.seconds / s.frames, 1)  # noqa: E731
            result["runs"][f"batch{bs}"] = {
                "frames_per_second": s.frames_per_second,
                "ms_per_frame": round(1000 * s.seconds / s.frames, 1),
                "stage_ms_per_frame": {"detect": per(detect), "edit": per(edit), "render": per(render),
                                       "other (crop, smoothing, encode, I/O)": round(
                                           1000 * s.seconds / s.frames - per(detect) - per(edit) - per(render), 1)},
                "peak_memory_mb": peak_memory_mb(device),
                "output_mean_abs_diff": s.output_mean_abs_diff,
                "input_mean_abs_diff": s.input_mean_abs_diff,
                "stability_ratio": s.stability_ratio,
            }
    detector.detect = detect.fn
    result["crop_jitter_mean_abs_diff_256"] = {f"smooth_radius_{r}": crop_jitter(frames, detector, r) for r in (0, 4)}
    emit(result, args.out)


if __name__ == "__main__":
    main()
