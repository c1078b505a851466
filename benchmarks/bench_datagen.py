"""Data-generation speed: edits per second per device.

    python benchmarks/bench_datagen.py [--device cpu|cuda] [--real-size] [--steps 20] [--out FILE]

Tiny: a whole `pipelines.datagen` run with configs/datagen_tiny.yaml (tiny random EG3D, InstructPix2Pix and
CLIP; 64 px) — end-to-end edits (variants) per second and InstructPix2Pix-only edits per second.
Real size (--real-size): the SD-1.5 InstructPix2Pix architecture with random weights at 512 px (timings do
not depend on the values): one UNet evaluation of the 3-way guided batch, VAE encode and decode, timed
separately and extrapolated to `--steps` sampling steps per edit (said so in the JSON).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from common import ROOT, SD15_UNET, SD15_VAE, emit, machine_info, peak_memory_mb, time_ms


def bench_tiny(device: torch.device, seeds: str) -> dict:
    from pipelines.datagen import main

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", f"device={device}", f"source.seeds={seeds}"]
        t0, cpu0 = time.perf_counter(), time.process_time()
        s = main(ROOT / "configs" / "datagen_tiny.yaml", overrides)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        # a second, fully resumed run: the cost of skipping finished work
        t1 = time.perf_counter()
        again = main(ROOT / "configs" / "datagen_tiny.yaml", overrides)
        resume = time.perf_counter() - t1
    return {"what": "tiny random models, 64 px, 2 steps (configs/datagen_tiny.yaml)",
            "variants": s["variants"], "units_kept": s["done"], "wall_s_incl_model_build": round(wall, 2),
            "edits_per_s_end_to_end": round(s["variants"] / wall, 2),
            "edits_per_s_instruct_pix2pix_only": round(s["edits_per_second"], 2),
            "resume_rerun_s": round(resume, 3), "resume_skipped": again["skipped"],
            # on a shared CPU, process CPU time / wall time shows how much of the wall clock was ours
            "process_cpu_s": round(cpu, 2)}


def bench_real(device: torch.device, steps: int, fp16: bool) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
    cpu0, wall0 = time.process_time(), time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device).eval()
    vae = AutoencoderKL(**SD15_VAE).to(device).eval()
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    lat = torch.randn(3, 8, 64, 64, device=device, dtype=dtype)  # text-cond, image-cond, uncond
    ctx = torch.randn(3, 77, 768, device=device, dtype=dtype)
    img = torch.randn(1, 3, 512, 512, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    reps = 1 if device.type == "cpu" else 5
    with torch.inference_mode():
        unet_ms = time_ms(lambda: unet(lat, t, encoder_hidden_states=ctx).sample, device, repeats=reps, warmup=1)
        enc_ms = time_ms(lambda: vae.encode(img).latent_dist.mode(), device, repeats=reps, warmup=0 if reps == 1 else 1)
        dec_ms = time_ms(lambda: vae.decode(lat[:1, :4]).sample, device, repeats=reps, warmup=0 if reps == 1 else 1)
    per_edit_ms = steps * unet_ms["median_ms"] + enc_ms["median_ms"] + dec_ms["median_ms"]
    return {"what": f"SD-1.5 InstructPix2Pix architecture, random weights, 512 px, {dtype}",
            "extrapolated": True,
            "method": f"{steps} × one UNet call on the 3-way guidance batch + VAE encode + VAE decode, timed separately",
            "unet_call_ms": unet_ms["median_ms"], "vae_encode_ms": enc_ms["median_ms"],
            "vae_decode_ms": dec_ms["median_ms"], "steps": steps,
            "ms_per_edit": round(per_edit_ms, 1), "edits_per_s": round(1000.0 / per_edit_ms, 4),
            "peak_memory_mb": peak_memory_mb(device),
            # on a shared CPU, process CPU time / wall time shows how much of the wall clock was ours
            "process_cpu_s": round(time.process_time() - cpu0, 1), "wall_s": round(time.perf_counter() - wall0, 1)}


def main() -> None:
    from utils.device import resolve_device

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seeds", default="0-7", help="tiny run: EG3D seeds")
    ap.add_argument("--real-size", action="store_true", help="also time the real-size InstructPix2Pix")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(args.device)
    result = {"benchmark": "datagen", "machine": machine_info(device), "tiny": bench_tiny(device, args.seeds)}
    if args.real_size:
        result["real_size"] = bench_real(device, args.steps, not args.no_fp16)
    emit(result, args.out)


if __name__ == "__main__":
    main()
