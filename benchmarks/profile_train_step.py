"""One full-size training step timed by stage, with the peak resident memory of each stage, as JSON.

    python benchmarks/profile_train_step.py                          # CPU, batch 1, 1 warm-up + 1 measured step
    python benchmarks/profile_train_step.py --threads 2 --batch 2 --render-chunk 2 --steps 2
    python benchmarks/profile_train_step.py --device cuda --bf16

The networks are the full-size ones from random weights (the `random_init` test hook) and the batch a synthetic
512² one (benchmarks/bench_train.py); the step is `training.train.train_step` itself, timed through its `stage`
argument: teacher lift / renders, student encode / renders, each loss family, D real+R1 / fake forward and
backward, D optimizer, G adversarial forward, backward of the G loss, G optimizer. Backward passes are charged
to the stage that runs them (the G loss backward covers the student's renders, LPIPS and encoder).

Memory, CPU: `peak_rss_mib` is the process's peak RSS over the whole run (getrusage); per stage, `stage_peak_rss_mib`
is the peak RSS inside that stage (Linux: /proc/self/clear_refs resets the high-water mark before each stage),
and `rss_after_mib` the RSS when it ends. CUDA: max allocated over the step and per stage.
Timings on a shared machine are noisy: compare the stages' shares, not absolute seconds; the process CPU seconds
(`cpu_seconds`, all threads) suffer less from other processes than wall seconds do.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import synthetic_dataset  # noqa: E402
from common import emit, machine_info, peak_memory_mb  # noqa: E402


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StageTimer:
    """`with timer("name"):` adds the wall seconds (and the peak memory) of the block to `name`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self.after_mib: dict[str, float] = {}
        self.order: list[str] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_hwm()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - c0
            if name not in self.seconds:
                self.order.append(name)
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                now = torch.cuda.memory_allocated(self.device) / 2**20
            else:
                peak = (_status_kib("VmHWM") or 0) / 1024
                now = (_status_kib("VmRSS") or 0) / 1024
            self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), peak)
            self.after_mib[name] = now


def main() -> None:
    """Options, the run under the stage timer, the table (one script read top to bottom, as the other benchmarks)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="measured steps (stage times: median over them)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--render-chunk", type=int, default=0, help="model.render_chunk (0 = no checkpointing)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more TrainConfig overrides, e.g. loss.id=0.1 loss.one_camera_per_batch=true")
    ap.add_argument("--resolution", type=int, default=512, help="synthetic images (64 with model.tiny=true)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from training.losses import ALEXNET_FILES, IRSE50_FILE
    from training.setup import build_training, set_modes
    from training.train import TrainConfig, cameras_for, to_device, train_step
    from utils import testing_hooks
    from utils.config import load_config
    from utils.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # random loss nets (same cost) unless both weight files are there (IR-SE50 is built when loss.id > 0)
    have_alexnet = any((Path("pretrained_models") / f).is_file() for f in ALEXNET_FILES) and \
        (Path("pretrained_models") / IRSE50_FILE).is_file()
    runs: list[StageTimer] = []
    step_seconds: list[float] = []
    step_cpu: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_dataset(tmp / "data", n=max(4, args.batch), res=args.resolution)
        cfg = load_config(TrainConfig, None, [
            "name=profile", f"exp_dir={tmp / 'exps'}", f"device={device}", f"bf16={str(args.bf16).lower()}",
            "export_3dpe=false", f"data.train_root={data}", f"data.resolution={args.resolution}", "data.val_root=", "data.val_fraction=0.0",
            f"data.batch_size={args.batch}", "data.workers=0", "model.init_checkpoint=",
            f"model.render_chunk={args.render_chunk}", "log.tqdm=false", *args.set])
        with testing_hooks.enabled(random_init=True, random_loss_nets=not have_alexnet):
            s = build_training(cfg)
        set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
        s.D.train()
        autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if args.bf16 \
            else contextlib.nullcontext
        views = 2 if cfg.loss.multiview else 1
        batch = to_device(next(iter(s.loader)), device)
        for i in range(args.warmup + args.steps):
            cams = cameras_for(batch, views, s.cam_gen, device, cfg.loss.one_camera_per_batch)
            timer = StageTimer(device)
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(s, cfg, batch, cams, i, autocast, stage=timer)
            timer._sync()
            if i >= args.warmup:
                step_seconds.append(time.perf_counter() - t0)
                step_cpu.append(time.process_time() - c0)
                runs.append(timer)
            print(f"[profile] step {i} ({'warm-up' if i < args.warmup else 'measured'}): "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    names = runs[0].order
    stages = {k: {"seconds": round(statistics.median(r.seconds[k] for r in runs), 3),
                  "cpu_seconds": round(statistics.median(r.cpu_seconds[k] for r in runs), 3),
                  "stage_peak_rss_mib" if device.type != "cuda" else "stage_peak_allocated_mib":
                      round(max(r.peak_mib[k] for r in runs), 1),
                  "rss_after_mib" if device.type != "cuda" else "allocated_after_mib":
                      round(runs[-1].after_mib[k], 1)} for k in names}
    total = statistics.median(step_seconds)
    for v in stages.values():
        v["share"] = round(v["seconds"] / total, 3)
    emit({
        "benchmark": "train_step_profile",
        "machine": machine_info(device),
        "batch_per_process": args.batch,
        "bf16": args.bf16,
        "render_chunk": args.render_chunk,
        "overrides": args.set,
        "steps_measured": len(step_seconds),
        "seconds_per_step_median": round(total, 3),
        "seconds_per_step_all": [round(t, 3) for t in step_seconds],
        # process CPU seconds (all threads): on a loaded machine, cpu / threads is closer to an idle machine's wall
        "cpu_seconds_per_step_median": round(statistics.median(step_cpu), 3),
        "stages": stages,
        # clear_refs also resets getrusage's peak: the run's peak is the larger of it and every stage's peak.
        "peak_memory_mib": max([peak_memory_mb(device)] + [max(r.peak_mib.values()) for r in runs]),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "lpips_backbone": "alexnet (pretrained)" if have_alexnet else "alexnet (random, same cost)",
    }, args.out)


if __name__ == "__main__":
    main()
