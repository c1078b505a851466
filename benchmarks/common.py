"""Shared benchmark helpers: machine description, timing (median after warm-up), peak memory, JSON output."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The timbrooks/instruct-pix2pix (SD-1.5) UNet, with its 8 input channels (4 noisy + 4 image latents), and VAE:
# diffusers constructor arguments for full-size random-weight models.
SD15_UNET = dict(
    sample_size=64, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, threads, torch version, device name."""
    from utils.device import cpu_name

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict:
    """Median / min / all of `repeats` runs of fn() in wall milliseconds, after `warmup` runs.

    Also the median process CPU time per run (`cpu_median_ms`): on a shared CPU the wall time grows with the
    load, while CPU time / threads stays close to the wall time the call takes on idle cores.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "cpu_median_ms": round(statistics.median(cpu), 2), "runs_ms": [round(t, 2) for t in times]}


def time_events_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> dict:
    """Median / min / all of `repeats` runs of fn() in milliseconds, after `warmup` runs.

    On CUDA each run is timed by a pair of CUDA events (the GPU's own clock: no host synchronisation between
    them), on a CPU by the wall clock.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
            "runs_ms": [round(t, 3) for t in times]}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident set size of the process (CPU), in MiB."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict, out: str | None = None) -> None:
    """Print the JSON result (and write it to `out` if given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        from utils.atomic import atomic_write_text

        atomic_write_text(out, text + "\n")
