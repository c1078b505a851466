"""Benchmark the two text-prompt paths (random weights, so nothing to download).

1. CLIP prompt encoder (`ClipPromptEncoder`): ms per text prompt, per image prompt, tiny and ViT-B-16 sizes.
2. InstructPix2Pix edit (`InstructPix2PixEditor`): ms per edit, tiny pipeline at 64 px / 20 steps, and the real
   SD-1.5 architecture at 512 px. On CPU the real one is measured with 1 step plus one timed UNet call
   (the per-step cost, 3 CFG branches), and the 20-step time is extrapolated: T(1 step) + 19 × T(UNet step).

    python benchmarks/bench_text_edit.py [--threads 2] [--device cpu] [--skip-full-ip2p] [--out result.json]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# common puts the repo root on sys.path
from common import SD15_UNET, SD15_VAE, emit, machine_info, peak_memory_mb, time_ms  # noqa: E402
from pipelines.instruct_pix2pix import (InstructPix2PixConfig, InstructPix2PixEditor,  # noqa: E402
                                       build_clip_tokenizer, build_tiny_instruct_pix2pix)
from models.editing.clip_prompt import ClipPromptConfig, ClipPromptEncoder, tiny_open_clip_config  # noqa: E402
from utils.device import resolve_device  # noqa: E402


def bench_clip(device: torch.device, repeats: int) -> dict:
    out = {}
    sizes = {
        "tiny": ClipPromptConfig(model_cfg=tiny_open_clip_config(), image_size=32, token_dim=64),
        "vit_b16": ClipPromptConfig(model_name="ViT-B-16"),
    }
    text = ["turn the man into a bronze statue"]
    for name, cfg in sizes.items():
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            enc = ClipPromptEncoder(cfg).to(device).eval()
        build_s = time.perf_counter() - t0
        image = torch.rand(1, 3, 512, 512, device=device) * 2 - 1
        with torch.inference_mode():
            t_text = time_ms(lambda: enc.encode_text(text), device, repeats)
            t_image = time_ms(lambda: enc.encode_image(image), device, repeats)
            text_ms, text_cpu = t_text["median_ms"], t_text["cpu_median_ms"]
            image_ms, image_cpu = t_image["median_ms"], t_image["cpu_median_ms"]
            mixed_ms = time_ms(lambda: enc.encode(image, text), device, repeats)["median_ms"]
            tokens, _ = enc.encode(image, text)
        out[name] = {"build_s": round(build_s, 2), "ms_per_text_prompt": round(text_ms, 2),
                     "ms_per_image_prompt_512px": round(image_ms, 2), "ms_per_image_plus_text": round(mixed_ms, 2),
                     "cpu_ms_per_text_prompt": round(text_cpu, 2), "cpu_ms_per_image_prompt": round(image_cpu, 2),
                     "mixed_tokens_shape": list(tokens.shape),
                     "params_total_M": round(sum(p.numel() for p in enc.parameters()) / 1e6, 2),
                     "params_trainable_M": round(sum(p.numel() for p in enc.parameters() if p.requires_grad) / 1e6, 3)}
        del enc
    return out


def build_sd15_instruct_pix2pix(device: torch.device, dtype: torch.dtype):
    """Random-weight pipeline with the real timbrooks/instruct-pix2pix (SD-1.5) architecture."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=1, projection_dim=768))
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_clip_tokenizer(77), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def bench_ip2p(device: torch.device, full: bool) -> dict:
    out = {}
    pipe = build_tiny_instruct_pix2pix(seed=0, device=device)
    editor = InstructPix2PixEditor.from_pipeline(pipe, InstructPix2PixConfig(resolution=64, steps=20))
    x = torch.rand(1, 3, 64, 64, device=device) * 2 - 1
    t = time_ms(lambda: editor(x, "make it red"), device, repeats=3)
    out["tiny_64px_20steps"] = {"ms_per_edit": round(t["median_ms"], 1), "cpu_ms_per_edit": round(t["cpu_median_ms"], 1)}
    if not full:
        return out

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    pipe = build_sd15_instruct_pix2pix(device, dtype)
    build_s = time.perf_counter() - t0
    x = torch.rand(1, 3, 512, 512, device=device) * 2 - 1
    res: dict = {"build_s": round(build_s, 1), "dtype": str(dtype).replace("torch.", ""),
                 "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)}
    if device.type == "cuda":
        editor = InstructPix2PixEditor.from_pipeline(pipe, InstructPix2PixConfig(resolution=512, steps=20))
        res["ms_per_edit_20steps"] = round(time_ms(lambda: editor(x, "make it red"), device, repeats=2)["median_ms"], 1)
        res["measured"] = "full 20-step edits"
    else:
        editor = InstructPix2PixEditor.from_pipeline(pipe, InstructPix2PixConfig(resolution=512, steps=1))
        t1 = time_ms(lambda: editor(x, "make it red"), device, repeats=1, warmup=0)
        one_step_ms, one_step_cpu = t1["median_ms"], t1["cpu_median_ms"]
        lat = torch.randn(3, 8, 64, 64, dtype=dtype, device=device)
        emb = torch.randn(3, 77, 768, dtype=dtype, device=device)
        t = torch.tensor([500.0], device=device)
        with torch.inference_mode():
            t_step = time_ms(lambda: pipe.unet(lat, t, encoder_hidden_states=emb), device, repeats=1, warmup=0)
        step_ms, step_cpu = t_step["median_ms"], t_step["cpu_median_ms"]
        res.update({
            "cpu_ms_1step_edit": round(one_step_cpu, 0),
            "cpu_ms_per_step_unet": round(step_cpu, 0),
            "cpu_ms_per_edit_20steps_extrapolated": round(one_step_cpu + 19 * step_cpu, 0),
            "ms_1step_edit": round(one_step_ms, 0),
            "ms_per_step_unet_3cfg_branches": round(step_ms, 0),
            "ms_per_edit_20steps_extrapolated": round(one_step_ms + 19 * step_ms, 0),
            "measured": "CPU: one 1-step edit (text encoder + VAE encode + 1 UNet step + VAE decode) and one UNet "
                        "call; 20-step time extrapolated as T(1 step) + 19 x T(UNet call)",
        })
    out["sd15_512px"] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-full-ip2p", action="store_true", help="skip the SD-1.5-size InstructPix2Pix")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result = {
        "benchmark": "bench_text_edit", "machine": machine_info(device), "weights": "random",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "note": "cpu_ms = process CPU time over all threads; on a shared machine wall ms grows with the load",
        "clip_prompt_encoder": bench_clip(device, args.repeats),
        "instruct_pix2pix": bench_ip2p(device, full=not args.skip_full_ip2p),
    }
    result["peak_memory_mb"] = peak_memory_mb(device)
    emit(result, args.out)


if __name__ == "__main__":
    main()
