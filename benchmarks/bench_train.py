"""Seconds per training step and peak memory of the full-size 3DPE distillation (batch 2 by default), as JSON.

    python benchmarks/bench_train.py                     # CUDA when present, else CPU
    python benchmarks/bench_train.py --device cpu --steps 2 --threads 2
    python benchmarks/bench_train.py --bf16 --steps 10
    python benchmarks/bench_train.py --device cpu --threads 2 --batch 1 --set compile=true   # torch.compile
    python benchmarks/bench_train.py --device cuda --bf16 --batch 1      # the GPU figure of issue #15
    python benchmarks/bench_train.py --device cpu --threads 2 --batch 1 --steps 3 \
        --set loss.id=0.1 loss.one_camera_per_batch=true model.frozen_dropout=true   # the work of the original's step

Runs the real loop (training/train.py: teacher + student + one renderer + D with R1 + LPIPS, both cameras)
on random-init full-size models and a synthetic 512² dataset written to a temporary folder; no weight files
are needed except that LPIPS uses a random AlexNet when `pretrained_models/alexnet-owt-*.pth` is absent
(same cost). The step time is the loop's own `time/step_seconds` (data loading excluded); the first
`--warmup` steps are dropped. Peak memory: max CUDA memory allocated, or the process's peak RSS on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, peak_memory_mb, reset_peak_memory  # noqa: E402


def synthetic_dataset(root: Path, n: int = 4, res: int = 512) -> Path:
    from utils.cameras import look_at_cameras

    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        name = f"img{i:08d}.png"
        for d in ("00000", "00000_style"):
            (root / d).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(root / d / name)
        labels.append([f"00000/{name}", look_at_cameras(math.pi / 2, math.pi / 2)[0].tolist()])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-gan", action="store_true")
    ap.add_argument("--render-chunk", type=int, default=0, help="model.render_chunk (0 = no checkpointing)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more TrainConfig overrides, e.g. loss.id=0.1 loss.one_camera_per_batch=true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.losses import ALEXNET_FILES, IRSE50_FILE
    from training.train import TrainConfig, main as train_main
    from utils import testing_hooks
    from utils.config import load_config
    from utils.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    steps = args.steps or (10 if device.type == "cuda" else 2)
    # random loss nets (same cost) unless both weight files are there (IR-SE50 is built when loss.id > 0)
    have_alexnet = any((Path("pretrained_models") / f).is_file() for f in ALEXNET_FILES) and \
        (Path("pretrained_models") / IRSE50_FILE).is_file()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_dataset(tmp / "data", n=max(4, args.batch * (steps + args.warmup)))
        # model.init_checkpoint empty: full-size networks from random weights (the random_init hook below)
        cfg = load_config(TrainConfig, None, [
            "name=bench", f"exp_dir={tmp / 'exps'}", f"max_steps={steps + args.warmup}", f"device={device}",
            f"bf16={str(args.bf16).lower()}", "export_3dpe=false", f"data.train_root={data}", "data.val_root=",
            "data.val_fraction=0.0", f"data.batch_size={args.batch}", "data.workers=2", "model.init_checkpoint=",
            f"model.render_chunk={args.render_chunk}", f"gan.enabled={str(not args.no_gan).lower()}",
            "log.log_interval=1", "log.image_interval=1000000000", "log.val_interval=1000000000",
            "log.save_interval=1000000000", "log.tqdm=false", *args.set])
        reset_peak_memory(device)
        with testing_hooks.enabled(random_init=True, random_loss_nets=not have_alexnet):
            res = train_main(cfg)
        peak = peak_memory_mb(device)
        acc = EventAccumulator(str(res.run_dir / "logs"), size_guidance={"scalars": 0})
        acc.Reload()
        all_times = [e.value for e in acc.Scalars("time/step_seconds")]
        warmup_times, times = all_times[:args.warmup], all_times[args.warmup:]
    n_train = sum(p.numel() for p in res.encoder.parameters() if p.requires_grad)
    emit({
        "benchmark": "train_step",
        "machine": machine_info(device),
        "batch_per_process": args.batch,
        "bf16": args.bf16,
        "gan": not args.no_gan,
        "render_chunk": args.render_chunk,
        "overrides": args.set,
        "views_per_sample": 2,
        "trainable_params": n_train,
        "steps_measured": len(times),
        "seconds_per_step_median": round(statistics.median(times), 3),
        "seconds_per_step_all": [round(t, 3) for t in times],
        "warmup_seconds": [round(t, 3) for t in warmup_times],  # with `--set compile=true`: the compile included
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "lpips_backbone": "alexnet (pretrained)" if have_alexnet else "alexnet (random, same cost)",
    }, args.out)


if __name__ == "__main__":
    main()
