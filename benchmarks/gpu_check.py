"""One prepared GPU check (issue #24): CUDA against CPU, speed against the targets, torchrun + resume.

    python benchmarks/gpu_check.py --out runs/gpu_check                        # one CUDA GPU, ≤ 8 minutes
    python benchmarks/gpu_check.py --out runs/gpu_check --parts ddp compile    # rerun some parts only
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check    # dry run of the same code on a CPU

Random weights from fixed seeds (nothing is read or downloaded). Writes OUT/gpu_check.json (every check: its
status, figures and limit or target) and OUT/gpu_check.md (the same as a table, with the GPU's name and the
torch version). The parts, in the order they run:

1. correctness: fp32, TF32 off, the CPU side computed in this process (torch threads = all cores).
   - the editor (built once on the CPU, a deep copy moved to the device): edited triplane max |Δ| / max |ref|
     ≤ 1e-4, three views at fixed cameras mean |Δ| ≤ 1/255 (in [0,1] image terms);
   - one training step (training.train.train_step, random-init models, batch 1, deterministic rendering):
     every loss term ≤ 1e-4 relative, every gradient (student and discriminator) ≤ 1e-3 of its tensor's max |g|;
   - the same step on the parity recipe of tests/training_parity.py (full size only).
2. speed (CUDA events, medians after a warm-up): edit + one 512² view at batch 1, fp32 (target ≤ 40 ms) and
   bf16 autocast (≤ 20 ms); edits + views at batch 8; a training step at batch 2, fp32 and bf16, with the peak
   memory (torch.cuda.max_memory_allocated).
3. ddp: `torchrun --standalone --nproc_per_node=1 train_scripts.py train --config configs/train_tiny.yaml` for
   3 steps (checkpoint at step 3), then `--resume` to step 5; and one all_reduce in a process group of the
   backend utils/distributed.py picks (NCCL on CUDA, gloo on a CPU).
4. compile: edit + one view in bf16 with the encoder's and the renderer's forward under
   torch.compile(mode="max-autotune-no-cudagraphs"), compile time apart; target: faster than eager.
   On a CPU (dry run) the backend is "eager" (graph capture only: no C++ kernels to build).

`--time-limit` (default 480 s) covers everything: once it is spent, the remaining checks are recorded as
'skipped: time'. A check that raises is recorded as failed with its one-line error, and the run goes on.
Exit code 0 when no check failed, 1 otherwise (a speed target not met is reported, not a failure),
2 for a usage error. `--tiny` uses the tiny models, 3 repeats and 2 + 1 torchrun steps (the dry run: about
3 minutes on 2 CPU cores, most of it the two torchrun launches and the tiny training steps).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import synthetic_dataset  # noqa: E402
from common import ROOT, machine_info, peak_memory_mb, reset_peak_memory, sync, time_events_ms  # noqa: E402

sys.path.append(str(ROOT / "tests"))  # training_parity: the parity recipe and its gradient summaries
from utils.errors import ThreeDPEError, report_user_error  # noqa: E402

PARTS = ("correctness", "speed", "ddp", "compile")
TRIPLANE_TOL = 1e-4            # max |Δ| / max |ref| of the edited triplane
VIEW_TOL = 1 / 255             # mean |Δ| of the views, images in [0, 1]
TARGET_MS = {"fp32": 40.0, "bf16": 20.0}   # edit + one 512² view, batch 1
COMPILE_MODE = "max-autotune-no-cudagraphs"
THROUGHPUT_BATCH = 8
TRAIN_BATCH = 2
DDP_STEPS, RESUMED_STEPS = 3, 5     # --tiny: 2, 3
NEEDS_S = {"ddp_run": 20.0, "compile": 60.0}   # a check starts only with this much of the budget left (CUDA)


class UsageError(ThreeDPEError):
    """A wrong command line: printed as one `error:` line, exit code 2."""


@dataclass
class Context:
    """What every part reads: the device, the model size, the repeats, the budget, a scratch folder, the results."""

    device: torch.device
    tiny: bool
    repeats: int
    warmup: int
    deadline: float
    work: Path
    results: dict[str, dict[str, dict]] = field(default_factory=dict)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


# ============================================================================================ records
def one_line(error: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def within(value: float, limit: float, what: str, **extra: Any) -> dict:
    """A correctness record: pass when value ≤ limit."""
    passed = bool(value <= limit)
    return {"status": "pass" if passed else "fail", "pass": passed, "value": value, "limit": limit,
            "measured": f"{what} {value:.3g}", "against": f"≤ {limit:.3g}", **extra}


def ok(measured: str, passed: bool, **extra: Any) -> dict:
    """A record whose pass/fail is a yes/no check (exit codes, steps)."""
    return {"status": "pass" if passed else "fail", "pass": bool(passed), "measured": measured, "against": "",
            **extra}


def timed(timing: dict, target_ms: float | None = None, **extra: Any) -> dict:
    """A speed record: the timing, and whether the median meets `target_ms` (None: no target)."""
    met = None if target_ms is None else bool(timing["median_ms"] <= target_ms)
    return {"status": "measured", "pass": None, **timing, "target_ms": target_ms, "met": met,
            "measured": f"{timing['median_ms']:.4g} ms (median of {len(timing['runs_ms'])})",
            "against": "" if target_ms is None else f"≤ {target_ms:g} ms", **extra}


def check(ctx: Context, section: str, name: str, fn: Callable[[], dict], needs_s: float = 0.0) -> dict:
    """Run one check into ctx.results[section][name]: 'skipped: time' when the budget is spent (or less than
    `needs_s` is left), its one-line error when it raises; one progress line on stderr."""
    t0, c0 = time.monotonic(), time.process_time()
    if ctx.time_left() <= needs_s:
        rec = {"status": "skipped", "pass": None, "reason": "time"}
    else:
        try:
            rec = fn()
        except Exception as e:  # noqa: BLE001 — every failure is recorded, the next check runs
            rec = {"status": "fail", "pass": False, "error": one_line(e)}
        finally:
            sync_quietly(ctx.device)
    rec["seconds"] = round(time.monotonic() - t0, 2)
    rec["cpu_seconds"] = round(time.process_time() - c0, 2)   # this process only (not torchrun's)
    ctx.results.setdefault(section, {})[name] = rec
    print(f"[gpu_check] {section}/{name}: {result_text(rec)}  {rec.get('measured', '')} "
          f"({rec['seconds']} s, cpu {rec['cpu_seconds']} s)",
          file=sys.stderr, flush=True)
    return rec


def free_memory(device: torch.device) -> None:
    """Give what the last part held back (its models are gone with its locals)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync_quietly(device: torch.device) -> None:
    with contextlib.suppress(Exception):
        sync(device)


def result_text(rec: dict) -> str:
    """pass / fail / met / not met / skipped: reason / fail: error."""
    if rec["status"] == "skipped":
        return f"skipped: {rec['reason']}"
    if "error" in rec:
        return f"fail: {rec['error']}"
    if rec["status"] == "measured":
        return {True: "met", False: "not met", None: "measured"}[rec["met"]]
    return rec["status"]


# ============================================================================================ shared pieces
@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls and convolutions without TF32 for the block (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def inputs(editor: Any, tiny: bool, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(images batch×3×R×R, reference 1×3×R×R) in [-1,1], from a fixed seed (CPU tensors); R is the editor's
    input side, 64 for the tiny models (which take any side; 64 keeps their triplanes small)."""
    resolution = 64 if tiny else editor.input_resolution
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1, \
        torch.rand(1, 3, resolution, resolution, generator=gen) * 2 - 1


def editor_outputs(editor: Any, image: torch.Tensor, reference: torch.Tensor,
                   cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited triplane 1×96×256², views V×3×512² in [-1,1]) of one image, on the CPU."""
    result = editor(image, reference=reference, cameras=cameras)  # the editor's one call, as every tool makes it
    return result.triplanes.cpu(), result.views["image"][0].cpu()


def train_setup(device: torch.device, tiny: bool, batch: int, work: Path, name: str) -> tuple[Any, Any]:
    """(TrainingSetup, TrainConfig) of the training loop on `device`: random-init models (tiny or full size, built
    on the CPU from cfg.seed, so every device gets the same weights), random loss nets, a synthetic dataset."""
    from training.config import TrainConfig
    from training.setup import build_training, set_modes
    from utils import testing_hooks
    from utils.config import load_config

    res = 64 if tiny else 512
    data = work / f"train_data_{res}"
    if not (data / "dataset.json").is_file():
        synthetic_dataset(data, n=max(4, batch), res=res)
    cfg = load_config(TrainConfig, None, [
        f"name={name}", f"exp_dir={work / 'exps'}", f"device={device}", "export_3dpe=false", f"data.train_root={data}",
        "data.val_root=", "data.val_fraction=0.0", f"data.resolution={res}", f"data.batch_size={batch}",
        "data.workers=0", "model.init_checkpoint=", f"model.tiny={str(tiny).lower()}", "log.tqdm=false"])
    with testing_hooks.enabled(random_init=True, random_loss_nets=True):
        s = build_training(cfg)
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    s.D.train()
    return s, cfg


def first_batch(s: Any, cfg: Any) -> tuple[dict, torch.Tensor]:
    """(the loader's first batch on the device, its V·N cameras)."""
    from training.train import cameras_for, to_device

    batch = to_device(next(iter(s.loader)), s.device)
    views = 2 if cfg.loss.multiview else 1
    return batch, cameras_for(batch, views, s.cam_gen, s.device, cfg.loss.one_camera_per_batch)


def bf16_autocast(device: torch.device) -> Callable[[], Any]:
    """The training loop's bf16 autocast (training/train.py `main`)."""
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def step_summary(s: Any, cfg: Any) -> dict:
    """One deterministic training step → {'terms', 'student_grads', 'discriminator_grads'} in the layout of
    tests/training_parity.py (gradient summaries on the CPU). The gradients are the ones the optimisers
    stepped with: train_step leaves them in .grad (D frozen after its own step)."""
    from training.train import train_step
    from training_parity import summarize

    batch, cams = first_batch(s, cfg)
    out = train_step(s, cfg, batch, cams, 0, contextlib.nullcontext, deterministic=True)
    terms = {k: float(v.detach()) for k, v in out.terms.items()}
    terms["total"] = float(out.loss.detach())

    def grads(module: torch.nn.Module) -> dict:
        return {n: summarize(p.grad.cpu()) for n, p in module.named_parameters() if p.grad is not None}

    return {"terms": terms, "student_grads": grads(s.encoder), "discriminator_grads": grads(s.D)}


def step_agreement(ours: dict, ref: dict) -> tuple[float, str, float, str]:
    """(worst term's relative difference, its name, worst gradient's difference / max |g|, its tensor)."""
    from training_parity import grad_agreement, relative

    missing = sorted(set(ref["terms"]) ^ set(ours["terms"]))
    if missing:
        raise ValueError(f"loss terms on one side only: {missing}")
    terms = {k: relative(ours["terms"][k], v) for k, v in ref["terms"].items()}
    worst_term = max(terms, key=terms.get)
    grads: dict[str, float] = {}
    for group in ("student_grads", "discriminator_grads"):
        g = grad_agreement(ours[group], ref[group])
        if g["missing"]:
            raise ValueError(f"{group}: tensors on one side only: {g['missing'][:3]}")
        grads.update({f"{group.split('_')[0]}.{k}": max(v) for k, v in g["per_tensor"].items()})
    worst_grad = max(grads, key=grads.get)
    return terms[worst_term], worst_term, grads[worst_grad], worst_grad


def step_record(ours: dict, ref: dict, **extra: Any) -> dict:
    """pass when every term is within TERM_TOL and every gradient within GRAD_TOL (tests/training_parity.py)."""
    from training_parity import GRAD_TOL, TERM_TOL

    term, term_name, grad, grad_name = step_agreement(ours, ref)
    passed = term <= TERM_TOL and grad <= GRAD_TOL
    return {"status": "pass" if passed else "fail", "pass": passed, "worst_term": term_name,
            "worst_term_rel": term, "worst_grad": grad_name, "worst_grad_rel": grad,
            "terms": len(ref["terms"]), "grads": len(ref["student_grads"]) + len(ref["discriminator_grads"]),
            "measured": f"terms {term:.3g} rel ({term_name}), grads {grad:.3g} of max |g| ({grad_name})",
            "against": f"≤ {TERM_TOL:g}, ≤ {GRAD_TOL:g}", **extra}


# ============================================================================================ 1. correctness
def part_correctness(ctx: Context) -> None:
    """The device against the CPU in fp32 without TF32: the editor, one training step, the parity recipe's step."""
    from pipelines.editor import PortraitEditor
    from utils.cameras import original_test_cameras

    cpu = torch.device("cpu")
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def editor_triplane() -> dict:
        ref = PortraitEditor.random_init(kind="edit", tiny=ctx.tiny, seed=0, device=cpu)
        ours = PortraitEditor(copy.deepcopy(ref.encoder), copy.deepcopy(ref.renderer), device=ctx.device)
        image, reference = inputs(ref, ctx.tiny)
        cams = original_test_cameras((-30.0, 0.0, 30.0), 0.0)
        outputs["ref"] = editor_outputs(ref, image, reference, cams)
        outputs["ours"] = editor_outputs(ours, image, reference, cams)
        a, b = outputs["ours"][0], outputs["ref"][0]
        return within(float((a - b).abs().max() / b.abs().max()), TRIPLANE_TOL, "max Δ / max ref")

    def editor_views() -> dict:
        if not outputs:
            raise RuntimeError("no editor outputs (editor_triplane failed)")
        a, b = ((v.clamp(-1, 1) + 1) / 2 for v in (outputs["ours"][1], outputs["ref"][1]))
        return within(float((a - b).abs().mean()), VIEW_TOL, "mean Δ", views=int(a.shape[0]),
                      view_std=float(b.std()))

    def training_step() -> dict:
        summaries = {}
        for side, dev in (("ref", cpu), ("ours", ctx.device)):
            s, cfg = train_setup(dev, ctx.tiny, 1, ctx.work, f"check_{side}")
            summaries[side] = step_summary(s, cfg)
            del s
        return step_record(summaries["ours"], summaries["ref"], models="tiny" if ctx.tiny else "full size, random")

    def training_step_recipe() -> dict:
        if ctx.tiny:
            return {"status": "skipped", "pass": None, "reason": "the recipe is full size (not with --tiny)"}
        from training_parity import our_training_step, write_recipe

        recipe = write_recipe(ctx.work / "recipe")
        ref = our_training_step(recipe, ctx.work / "recipe_cpu")
        ours = our_training_step(recipe, ctx.work / "recipe_dev", device=ctx.device)
        return step_record(ours, ref, models="tests/training_parity.py recipe")

    with no_tf32():
        check(ctx, "correctness", "editor_triplane", editor_triplane)
        check(ctx, "correctness", "editor_views", editor_views)
        check(ctx, "correctness", "training_step", training_step)
        check(ctx, "correctness", "training_step_recipe", training_step_recipe)


# ============================================================================================ 2. speed
def part_speed(ctx: Context) -> None:
    """Edit + one 512² view at batch 1 (fp32, bf16), batch-8 throughput, a training step at batch 2."""
    from pipelines.editor import PortraitEditor
    from training.train import train_step
    from utils.cameras import original_test_cameras

    n = 2 if ctx.tiny else THROUGHPUT_BATCH
    one_view = original_test_cameras((0.0,), 0.0)
    built: dict[str, Any] = {}   # built by the first check that needs it (nothing when the budget is spent)

    def editor(precision: str) -> tuple[Any, Any, torch.Tensor]:
        """(an editor in `precision`, the prompt, n images on the device); every precision shares one set of modules."""
        if "editor" not in built:
            built["editor"] = PortraitEditor.random_init(kind="edit", tiny=ctx.tiny, seed=0, device=ctx.device)
            built["images"], built["reference"] = inputs(built["editor"], ctx.tiny, n)
        base = built["editor"]
        ed = PortraitEditor(base.encoder, base.renderer, device=ctx.device, precision=precision)
        return ed, ed.prompt(reference=built["reference"]), built["images"].to(ctx.device)

    def edit_one_view(precision: str) -> dict:
        ed, prompt, images = editor(precision)
        t = time_events_ms(lambda: ed(images[:1], prompt=prompt, cameras=one_view), ctx.device, ctx.repeats,
                           ctx.warmup)
        return timed(t, TARGET_MS[precision])

    def throughput(precision: str) -> dict:
        ed, prompt, images = editor(precision)
        cams = one_view.expand(n, 1, 25)  # input i at its own camera: one batched render of the n triplanes
        reset_peak_memory(ctx.device)
        t = time_events_ms(lambda: ed(images, prompt=prompt, cameras=cams), ctx.device, ctx.repeats, ctx.warmup)
        per_s = n * 1000 / t["median_ms"]
        rec = timed(t, None, batch=n, images_per_s=round(per_s, 2), peak_memory_mib=peak_memory_mb(ctx.device))
        rec["measured"] = f"{per_s:.4g} edits + views / s ({rec['measured']} per batch)"
        return rec

    def train(precision: str) -> dict:
        if "train" not in built:
            built["train"] = train_setup(ctx.device, ctx.tiny, TRAIN_BATCH, ctx.work, "speed")
        s, cfg = built["train"]
        batch, cams = first_batch(s, cfg)
        autocast = bf16_autocast(ctx.device) if precision == "bf16" else contextlib.nullcontext
        reset_peak_memory(ctx.device)
        t = time_events_ms(lambda: train_step(s, cfg, batch, cams, 0, autocast), ctx.device, ctx.repeats,
                           ctx.warmup)
        mem = peak_memory_mb(ctx.device)
        rec = timed(t, None, seconds_per_step=round(t["median_ms"] / 1000, 4), peak_memory_mib=mem,
                    batch=TRAIN_BATCH,
                    peak_memory_kind="cuda_max_allocated" if ctx.device.type == "cuda" else "process_peak_rss")
        rec["measured"] = f"{t['median_ms'] / 1000:.3g} s/step (median of {len(t['runs_ms'])}), peak {mem:g} MiB"
        return rec

    for precision in ("fp32", "bf16"):
        check(ctx, "speed", f"edit_1view_{precision}", lambda p=precision: edit_one_view(p))
        check(ctx, "speed", f"batch{n}_{precision}", lambda p=precision: throughput(p))
    built.pop("editor", None)
    for precision in ("fp32", "bf16"):
        check(ctx, "speed", f"train_step_b{TRAIN_BATCH}_{precision}", lambda p=precision: train(p))

# ============================================================================================ 3. ddp
def torchrun_train(ctx: Context, data: Path, exps: Path, max_steps: int, save_interval: int,
                   resume: bool) -> tuple[str, dict]:
    """Run `torchrun --standalone --nproc_per_node=1 train_scripts.py train --config configs/train_tiny.yaml`
    (tiny models, `data`, run folder exps/ddp) to `max_steps`, with `--resume` when `resume`. Returns (its stdout,
    {'dir', 'step'} of the newest checkpoint); RuntimeError with the last stderr line when it exits non-zero."""
    from training.state import latest_checkpoint, load_training_state

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train_scripts.py"), "train", "--config", str(ROOT / "configs" / "train_tiny.yaml"),
           f"data.train_root={data}", f"exp_dir={exps}", "name=ddp", f"device={ctx.device.type}",
           f"max_steps={max_steps}", f"log.save_interval={save_interval}", "export_3dpe=false", "log.tqdm=false",
           *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(ctx.time_left(), 30.0))
    if proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
        raise RuntimeError(f"exit code {proc.returncode}: {last.strip()}")
    ckpt = latest_checkpoint(exps / "ddp" / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"no checkpoint under {exps / 'ddp' / 'checkpoints'}")
    return proc.stdout, {"dir": ckpt.name, "step": int(load_training_state(ckpt)["step"])}


def part_ddp(ctx: Context) -> None:
    """torchrun for DDP_STEPS steps, then --resume to RESUMED_STEPS (tiny: 2, 3); one collective of the backend
    utils/distributed.py picks."""
    data, exps = ctx.work / "ddp_data", ctx.work / "ddp_exps"
    steps, resumed = (2, 3) if ctx.tiny else (DDP_STEPS, RESUMED_STEPS)
    needs = 0.0 if ctx.device.type == "cpu" else NEEDS_S["ddp_run"]

    def first_run() -> dict:
        synthetic_dataset(data, n=8, res=64)
        _, state = torchrun_train(ctx, data, exps, steps, steps, resume=False)
        return ok(f"exit 0, checkpoint {state['dir']} (step {state['step']})", state["step"] == steps,
                  exit_code=0, checkpoint_step=state["step"])

    def resumed_run() -> dict:
        if ctx.results["ddp"]["torchrun"]["status"] != "pass":
            raise RuntimeError("nothing to resume (the first torchrun run failed)")
        out, state = torchrun_train(ctx, data, exps, resumed, steps, resume=True)
        m = re.search(r"resuming from step (\d+)", out)
        started = int(m.group(1)) if m else None
        return ok(f"exit 0, started at step {started}, checkpoint {state['dir']} (step {state['step']})",
                  started == steps and state["step"] == resumed, exit_code=0, started_at=started,
                  checkpoint_step=state["step"])

    def collective() -> dict:
        import torch.distributed as dist

        backend = "nccl" if ctx.device.type == "cuda" else "gloo"   # as utils/distributed.init_distributed
        kwargs = {"device_id": ctx.device} if ctx.device.type == "cuda" else {}
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        try:
            t = torch.full((4,), 2.0, device=ctx.device)
            dist.all_reduce(t)
            dist.barrier()
            value = float(t.sum())
        finally:
            dist.destroy_process_group()
        return ok(f"{backend} all_reduce at world size 1: sum {value:g}", value == 8.0, backend=backend)

    check(ctx, "ddp", "torchrun", first_run, needs)
    check(ctx, "ddp", "resume", resumed_run, needs)
    check(ctx, "ddp", "collective", collective)
    ctx.results["ddp"]["note"] = {"status": "note", "pass": None, "measured": (
        "with one process torchrun sets WORLD_SIZE=1 and utils/distributed.py makes no process group "
        "(DDP wrapping needs WORLD_SIZE > 1); the collective check runs the backend alone"), "against": ""}


# ============================================================================================ 4. compile
def part_compile(ctx: Context) -> None:
    """bf16 edit + one view, eager then with the encoder's and renderer's forward compiled."""
    from pipelines.editor import PortraitEditor
    from utils.cameras import original_test_cameras

    def compiled() -> dict:
        editor = PortraitEditor.random_init(kind="edit", tiny=ctx.tiny, seed=0, device=ctx.device, precision="bf16")
        one_view = original_test_cameras((0.0,), 0.0)
        image, reference = inputs(editor, ctx.tiny)
        image, prompt = image.to(ctx.device), editor.prompt(reference=reference)

        def run() -> torch.Tensor:
            return editor(image, prompt=prompt, cameras=one_view).views["image"][0]

        eager = time_events_ms(run, ctx.device, ctx.repeats, ctx.warmup)
        eager_out = run().float()
        mode = COMPILE_MODE if ctx.device.type == "cuda" else None
        editor.compile(mode=mode, backend="inductor" if ctx.device.type == "cuda" else "eager")  # as `--compile`
        t0 = time.perf_counter()
        out = run().float()
        sync(ctx.device)
        compile_s = time.perf_counter() - t0
        t = time_events_ms(run, ctx.device, ctx.repeats, ctx.warmup)
        rec = timed(t, None, compile_seconds=round(compile_s, 1), eager_median_ms=eager["median_ms"],
                    mode=mode, meets_bf16_target=bool(t["median_ms"] <= TARGET_MS["bf16"]),
                    max_abs_diff_vs_eager=float((out - eager_out).abs().max()))
        rec["met"] = bool(t["median_ms"] < eager["median_ms"])
        rec["measured"] = f"{t['median_ms']:.4g} ms (median of {len(t['runs_ms'])}), compile {compile_s:.0f} s"
        rec["against"] = f"< eager {eager['median_ms']:.4g} ms"
        return rec

    check(ctx, "compile", "edit_1view_bf16_compiled", compiled, 0.0 if ctx.device.type == "cpu" else NEEDS_S["compile"])


# ============================================================================================ report
TITLES = {"correctness": "correctness (fp32, TF32 off, against the CPU)", "speed": "speed", "ddp": "torchrun / DDP",
          "compile": "torch.compile"}


def markdown(report: dict) -> str:
    """The report as a markdown table (part | check | measured | limit / target | result)."""
    m = report["machine"]
    lines = [f"# GPU check: {m.get('gpu', m['cpu'])}", "",
             f"torch {m['torch']} (CUDA {report['cuda_version']}), device `{m['device']}`, "
             f"{'tiny' if report['tiny'] else 'full-size'} models with random weights, {report['started']}, "
             f"{report['elapsed_s']:.0f} s of a {report['time_limit_s']:g} s budget; "
             f"CPU side: {m['cpu']}, {m['torch_threads']} threads.", "",
             "| part | check | measured | limit / target | result |", "|---|---|---|---|---|"]
    for section, checks in report["results"].items():
        for name, rec in checks.items():
            shown = "note" if rec["status"] == "note" else result_text(rec)
            cells = [TITLES.get(section, section), name, rec.get("measured", ""), rec.get("against", ""), shown]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    verdict = verdict_text(report) + ("" if report["complete"] else " so far (the run did not finish)")
    return "\n".join(lines + ["", f"Result: {verdict}."]) + "\n"


def verdict_text(report: dict) -> str:
    """'no check failed (N skipped)' or 'FAILED: part/check, ...'."""
    if report["failed"]:
        return f"FAILED: {', '.join(report['failed'])}"
    skipped = sum(r["status"] == "skipped" for checks in report["results"].values() for r in checks.values())
    return f"no check failed ({skipped} skipped)"


def write_report(out: Path, report: dict) -> None:
    from utils.atomic import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(report))


# ============================================================================================ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md (created)")
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and 3 repeats (a dry run on a CPU)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds for everything (default 480)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which parts (default all)")
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder (created when missing)")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}; use cuda, cuda:N or cpu") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA device; run it on a GPU machine, "
                         "or `--device cpu --tiny` for a dry run")
    if args.device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device}: only cuda and cpu are checked")
    if args.device.type == "cuda" and args.device.index is None:  # NCCL's device_id needs the index
        args.device = torch.device("cuda", torch.cuda.current_device())
    return args


def build_report(ctx: Context, args: argparse.Namespace, started: str, t_start: float, complete: bool) -> dict:
    """The JSON report: machine, settings, every record so far, the failed checks; `complete` False while running."""
    failed = [f"{s}/{n}" for s, checks in ctx.results.items() for n, r in checks.items() if r["status"] == "fail"]
    return {"check": "gpu_check", "complete": complete, "machine": machine_info(args.device), "tiny": args.tiny,
            "cuda_version": torch.version.cuda, "started": started, "time_limit_s": args.time_limit,
            "elapsed_s": round(time.monotonic() - t_start, 1), "repeats": ctx.repeats,
            "tf32_during_speed": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                  "cudnn": torch.backends.cudnn.allow_tf32},
            "passed": not failed, "failed": failed, "results": ctx.results}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts, write OUT/gpu_check.json + .md (after every part, so a killed run keeps what it measured);
    0 when no check failed, 1 otherwise, 2 on a usage error."""
    t_start = time.monotonic()
    try:
        args = parse_args(argv)
    except UsageError as e:
        return report_user_error(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)   # the CPU side of the comparisons uses every core
    started = datetime.datetime.now().isoformat(timespec="seconds")
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            ctx = Context(device=args.device, tiny=args.tiny, repeats=3 if args.tiny else 20,
                          warmup=1 if args.tiny else 3, deadline=t_start + args.time_limit, work=Path(tmp))
            for name in (p for p in PARTS if p in args.parts):
                try:
                    globals()[f"part_{name}"](ctx)
                except Exception as e:  # noqa: BLE001 — a part that fails outside its checks: recorded, go on
                    check(ctx, name, "part", lambda e=e: {"status": "fail", "pass": False, "error": one_line(e)})
                write_report(out, build_report(ctx, args, started, t_start, complete=False))
                free_memory(ctx.device)
        report = build_report(ctx, args, started, t_start, complete=True)
        write_report(out, report)
    finally:
        torch.set_num_threads(threads)
    print(f"[gpu_check] {verdict_text(report)}; {report['elapsed_s']:.0f} s; {out / 'gpu_check.md'}",
          file=sys.stderr)
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
