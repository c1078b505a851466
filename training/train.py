"""Distil the 3DPE editing module: the training loop, top to bottom.

    torchrun --nproc_per_node=8 train_scripts.py train --config configs/train.yaml name=run1
    python train_scripts.py train --config configs/train_tiny.yaml          # one process (CPU or one GPU)

What happens per step (per sample: the input camera from the dataset label + a random camera):
  teacher  = frozen Live3D LT encoder (eval, no_grad) lifts the 2D-edited TARGET to a triplane;
  student  = the editing encoder lifts the INPUT, conditioned on the reference's prompt tokens;
  one frozen TriplaneRenderer renders both at both cameras; the student learns the teacher's triplane and
  renders (L1, LPIPS, depth, optional features/ID) plus a non-saturating GAN against a reference-conditioned
  dual discriminator (R1 on the real pair), switched on at `gan.start_step`.
Every forward that needs gradients for trainable parameters goes through its DDP wrapper (student, D);
the generator-side D pass uses the frozen D's plain module, which needs no gradient synchronisation.

Where the parts live: the settings in training/config.py; networks, data, optimisers, DDP and resume in
training/setup.py; the losses and the D / G update steps in training/losses.py; checkpoints, snapshots and
the 3dpe.pt export in training/state.py.

Resume is exact: the data order (an infinite sampler that starts at the saved epoch and batch), the per-item
random draws (seeded by (seed, epoch, index) in the dataset), the cameras (a generator per rank) and every RNG
state are checkpointed, so a run stopped after step k and resumed ends bit-identical to an uninterrupted one.
Under `torchrun --max-restarts=N` a restarted worker group resumes by itself from the newest complete
checkpoint (training/setup.py `resume_target`).

Rank 0 says where the run writes, the TensorBoard command and the resume point (stdout), and shows the progress
(stderr; training/console.py). Ctrl-C or SIGTERM finishes the step, checkpoints it on every rank and ends with
one line naming the command that resumes the run (training/interrupt.py; exit code 130 / 143).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from training import state as st
from training.config import DataConfig, GanConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig
from training.losses import LossConfig, Stage, d_fake_step, d_real_step, g_adv_loss, generator_step, no_stage
from training import console
from training.interrupt import StopOnSignal, resume_command, signal_name
from training.setup import IndexedEpochs, TrainingSetup, build_training, set_modes
from utils import distributed as du
from utils.config import load_config, save_config

__all__ = ["DataConfig", "GanConfig", "LogConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "StepOutput", "TrainResult", "main", "run", "train_step"]


@dataclass
class TrainResult:
    """What `main` hands back: the run directory, the last step and the trained modules (on their device)."""

    run_dir: Path
    step: int
    stopped: bool
    encoder: nn.Module
    renderer: nn.Module
    discriminator: nn.Module
    signal: int = 0                  # the signal that stopped the run (0: it ended)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal that stopped it (130 for Ctrl-C, 143 for SIGTERM), as a shell reports it."""
        return 128 + self.signal if self.signal else 0


# ============================================================================================ step pieces
def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch onto `device` (lists such as 'instruction' stay as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cameras_for(batch: dict[str, Any], views: int, gen: torch.Generator, device: torch.device,
                one_per_batch: bool = False) -> torch.Tensor:
    """V·N×25 cameras, view-major: the inputs' own cameras, then (V = 2) one random training camera each, or
    (`one_per_batch`, the original's way) one random camera shared by the whole batch."""
    from utils.cameras import sample_training_cameras

    cams = [batch["camera"]]
    if views == 2:
        n = batch["camera"].shape[0]
        mv = sample_training_cameras(1 if one_per_batch else n, generator=gen).to(device)
        cams.append(mv.expand(n, -1))
    return torch.cat(cams)


def d_sized(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """N×3×H×W → N×3×resolution² (antialiased bilinear; unchanged when already that size)."""
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def teacher_views(s: TrainingSetup, target: torch.Tensor, cams: torch.Tensor, deterministic: bool,
                  autocast: Callable[[], Any], stage: Stage = no_stage) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's triplane of the N targets and its renders at the V·N cameras (no graph kept)."""
    with torch.no_grad(), autocast():
        with stage("teacher/lift"):
            tri = s.teacher(target)
        with stage("teacher/render"):
            planes = tri.repeat(cams.shape[0] // tri.shape[0], 1, 1, 1)
            return tri, s.renderer(planes, cams, deterministic=deterministic)


def image_grid(columns: list[torch.Tensor], size: int) -> torch.Tensor:
    """Columns of N×3×H×W images in [-1,1] → one 3×(N·size)×(C·size) grid in [0,1] (rows = samples)."""
    tiles = [F.interpolate(c.detach().float().clamp(-1, 1), size=(size, size), mode="bilinear",
                           align_corners=False, antialias=True) for c in columns]
    rows = torch.cat(tiles, dim=3)                       # N×3×size×(C·size)
    return ((torch.cat(list(rows), dim=1) + 1) / 2).cpu()


def sample_grid(batch: dict[str, Any], s_views: dict, t_views: dict, n: int, views: int, size: int) -> torch.Tensor:
    """Up to 4 samples: input | reference | teacher | student at the input camera (+ both at the random one)."""
    k = min(n, 4)
    cols = [batch["input"][:k], batch["reference"][:k], t_views["image"][:k], s_views["image"][:k]]
    if views == 2:
        cols += [t_views["image"][n:n + k], s_views["image"][n:n + k]]
    return image_grid(cols, size)


def validate(s: TrainingSetup, cfg: TrainConfig, step: int, writer: Any, autocast: Callable[[], Any]) -> None:
    """Losses on the held-out split (deterministic rendering, fixed cameras), and one fixed grid.

    Runs on every rank (each on its share of the split) under a forked RNG, so training's random streams
    are untouched; rank 0 writes the `val/…` means.
    """
    if s.val_set is None or len(s.val_set) == 0:
        return
    info, device = s.info, s.device
    views = 2 if cfg.loss.multiview else 1
    vs = DistributedSampler(s.val_set, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    vl = DataLoader(IndexedEpochs(s.val_set), batch_size=cfg.data.val_batch_size,
                    sampler=[(0, i) for i in vs], num_workers=0)
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    sums: dict[str, float] = {}
    count = 0
    s.encoder.eval()
    s.teacher.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for bi, batch in enumerate(vl):
            if cfg.data.val_batches and bi >= cfg.data.val_batches:
                break
            batch = to_device(batch, device)
            n = batch["input"].shape[0]
            cams = cameras_for(batch, views, gen, device)
            with autocast():
                s_tri, s_views = s.student(batch["input"], batch["reference"], cams, deterministic=True)
            t_tri, t_views = teacher_views(s, batch["target"], cams, True, autocast)
            total, terms = s.loss_fn(s_tri, t_tri, s_views, t_views, n)
            for k, v in {"total": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            count += 1
            if bi == 0 and writer is not None:
                writer.add_image("val/grid", sample_grid(batch, s_views, t_views, n, views, cfg.log.image_size), step)
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    # Every rank reports the same keys; ranks without a batch report zeros with weight 0.
    keys = sorted(sums) if sums else []
    keys = du.broadcast_object(keys)
    means = du.all_reduce_mean({**{k: sums.get(k, 0.0) for k in keys}, "_count": float(count)}, device)
    if writer is not None and means.get("_count", 0) > 0:
        for k in keys:
            writer.add_scalar(f"val/{k}", means[k] / means["_count"], step)


@dataclass
class StepOutput:
    """One training step's results: the weighted total (student side), its unweighted terms, the D step's
    scalars (+ 'grad_norm/student' when clipping), and the student's and teacher's renders (V·N-batched).
    Scalars are 0-dim tensors on the device: the step reads nothing back (the loop does, on logging steps)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logs: dict[str, torch.Tensor]
    s_views: dict[str, torch.Tensor]
    t_views: dict[str, torch.Tensor]


def train_step(s: TrainingSetup, cfg: TrainConfig, batch: dict[str, Any], cams: torch.Tensor, step: int,
               autocast: Callable[[], Any], deterministic: bool = False, stage: Stage = no_stage) -> StepOutput:
    """One step on a batch already on the device, at the V·N cameras `cams` (`cameras_for`): teacher, student,
    distillation loss, the D step and the GAN term (from `gan.start_step`), the student's update, the schedule.
    `deterministic` renders without random draws (parity checks); training renders randomly. `stage` times the
    parts (benchmarks/profile_train_step.py)."""
    n = batch["input"].shape[0]
    prompt_kw: dict[str, Any] = {}
    if cfg.model.prompt_encoder == "clip":  # each sample: its instruction text or the reference image
        texts = list(batch["instruction"])
        has_text = torch.tensor([bool(t.strip()) for t in texts])  # no text: always the reference image
        use_text = (torch.rand(n, generator=s.cam_gen) < cfg.model.text_prompt_prob) & has_text
        prompt_kw = {"texts": texts, "use_text": use_text.to(s.device)}
    if stage is not no_stage:
        prompt_kw["stage"] = stage

    s.opt_g.zero_grad(set_to_none=True)  # last step's student gradients are not kept alive through the forward
    gan = cfg.gan.enabled and cfg.loss.adv > 0 and step >= cfg.gan.start_step
    if gan:  # D's real side (+R1) first: it needs nothing of the student, and its graph is gone before the student's
        r = s.D.config.img_resolution
        real, ref = d_sized(batch["target"], r), d_sized(batch["reference"], r)
        real_side = d_real_step(s.D_ddp, s.opt_d, real, ref, batch["camera"], cfg.loss.r1_gamma, stage)
        del real
    # Teacher: the 2D-edited target lifted to 3D, rendered at both cameras (no graph kept).
    t_tri, t_views = teacher_views(s, batch["target"], cams, deterministic, autocast, stage)
    # Student: through the DDP wrapper so gradients are averaged over ranks.
    with autocast():
        s_tri, s_views = s.student_ddp(batch["input"], batch["reference"], cams, deterministic=deterministic,
                                       **prompt_kw)
    loss, terms = s.loss_fn(s_tri, t_tri, s_views, t_views, n, stage)
    logs: dict[str, torch.Tensor] = {}
    if gan:
        fake = s_views["image"][:n].float()
        logs.update(d_fake_step(s.D_ddp, s.opt_d, real_side, fake, ref, batch["camera"], cfg.optim.grad_clip, stage))
        with stage("G/adversarial_forward"):
            terms["gan"] = g_adv_loss(s.D, fake, ref, batch["camera"])  # D is frozen now: gradients reach `fake`
        loss = loss + cfg.loss.adv * terms["gan"]
    logs.update(generator_step(loss, s.opt_g, s.trainable, cfg.optim.grad_clip, stage))
    s.sched_g.step()
    return StepOutput(loss, terms, logs, s_views, t_views)


def save(s: TrainingSetup, cfg: TrainConfig, step: int, epoch: int, position: int) -> None:
    """Checkpoint `step` (call on every rank: the RNG states are gathered); (epoch, position) = the next batch."""
    rng = st.gather_rng({"cameras": s.cam_gen})
    if s.info.is_main:
        state = st.training_state(step=step, epoch=epoch, position=position, encoder=s.encoder, D=s.D,
                                  opt_g=s.opt_g, opt_d=s.opt_d, sched_g=s.sched_g, rng=rng,
                                  world_size=s.info.world_size, cfg=cfg)
        st.save_checkpoint(s.ckpt_root, step, state, st.snapshot_writer(s.encoder, s.renderer, s.configs, s.source,
                                                                         step, s.card), keep_last=cfg.log.keep_last)
    du.barrier()


# ============================================================================================ the loop
def main(cfg: TrainConfig, train_set: Dataset | None = None, val_set: Dataset | None = None,
         resume_hint: str | None = None) -> TrainResult:
    """Train (or resume); `train_set`/`val_set` replace the config's data (customize uses this).

    Rank 0 prints the run folder, the TensorBoard command, the resume point and the end (stdout), and the
    progress (stderr, `log.tqdm`). SIGINT/SIGTERM finish the step, checkpoint it and stop; the last line names
    `resume_hint`, the command that resumes the run (default: `train_scripts.py train` on its config.yaml).
    One function on purpose: the loop reads top to bottom in one place (nanoGPT's way); its parts live in
    `train_step`, `validate`, `save` and training/setup.py.
    """
    s = build_training(cfg, train_set, val_set)
    info, device = s.info, s.device
    writer = None
    if info.is_main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, s.run_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter

        # Everything logged at step k (scalars, grids, validation) is flushed before step k's checkpoint, so a
        # resume from k purges only the events of the steps after k (written by the run that went on past it).
        # A torchrun restart without a checkpoint starts over, so it purges everything the killed attempt wrote.
        purge = s.step + 1 if s.resume_dir is not None else (0 if s.restarts else None)
        writer = SummaryWriter(str(s.run_dir / "logs"), purge_step=purge)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if cfg.bf16 \
        else contextlib.nullcontext
    views = 2 if cfg.loss.multiview else 1
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    s.D.train()
    progress = None
    if info.is_main:
        for line in console.start_lines(s.run_dir, s.resume_dir, s.step, s.total_steps, s.steps_per_epoch,
                                        cfg.data.batch_size, info.world_size, device):
            console.say(line)
        if cfg.log.tqdm:
            progress = console.Progress(s.total_steps, s.step, cfg.name, cfg.log.log_interval)

    step, epoch, position = s.step, s.epoch, s.position
    stopped, signum = False, 0
    with StopOnSignal(announce=info.is_main) as stop:  # SIGINT/SIGTERM: finish the step, save it, stop
        for batch in (s.loader if step < s.total_steps else ()):  # the loader never ends: `last` below stops
            t0 = time.perf_counter()
            batch = to_device(batch, device)
            n = batch["input"].shape[0]
            cams = cameras_for(batch, views, s.cam_gen, device, cfg.loss.one_camera_per_batch)
            out = train_step(s, cfg, batch, cams, step, autocast)
            loss, terms, logs, s_views, t_views = out.loss, out.terms, out.logs, out.s_views, out.t_views
            step += 1
            position += 1
            signum = stop.agreed()  # every rank: a signal that reached any rank stops all after this step

            # ---- logging (every rank joins the reductions): the only steps that read values from the device,
            # all scalars in one transfer; the other steps queue work without waiting for it
            logged = None
            if console.is_logging_step(step, s.step, s.total_steps, cfg.log.log_interval):
                scalars = {f"loss/{k}": v for k, v in {"total": loss, **terms}.items()}
                scalars.update(logs)
                scalars = du.all_reduce_mean(scalars, device)
                logged = scalars["loss/total"]
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(k, v, step)
                    writer.add_scalar("lr/student", s.opt_g.param_groups[0]["lr"], step)
                    writer.add_scalar("lr/discriminator", s.opt_d.param_groups[0]["lr"], step)
                    writer.add_scalar("time/step_seconds", time.perf_counter() - t0, step)
                    writer.add_scalar("progress/epoch", epoch, step)
            if writer is not None and step % cfg.log.image_interval == 0:
                writer.add_image("train/grid", sample_grid(batch, s_views, t_views, n, views, cfg.log.image_size),
                                 step)
            if progress is not None:
                progress.update(step, epoch, logged)
            if step % cfg.log.val_interval == 0:
                validate(s, cfg, step, writer, autocast)

            # ---- checkpoint: (epoch, position) names the next batch, as the sampler will produce it
            if position == s.steps_per_epoch:
                epoch, position = epoch + 1, 0
            last = step >= s.total_steps or signum > 0
            if step % cfg.log.save_interval == 0 or last:
                if writer is not None:
                    writer.flush()  # on disk before the checkpoint: a killed rank 0 loses no event a resume keeps
                save(s, cfg, step, epoch, position)
            if last:
                stopped = step < s.total_steps  # by a signal
                break

    # ---- finish: slim inference snapshot (+ the original 3dpe.pt layout)
    if info.is_main and not stopped:
        st.write_final(s.run_dir, s.encoder, s.renderer, s.D, s.configs, s.source, step, cfg, s.card)
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    signum = signum if stopped else 0  # a signal after the last step: the run is complete
    if info.is_main:
        console.say(end_line(s, cfg, step, signum, resume_hint, train_set is not None))
    du.barrier()  # no rank leaves before rank 0 has said so (torchrun ends the others when one rank exits)
    return TrainResult(s.run_dir, step, stopped, s.encoder, s.renderer, s.D, signum)


def end_line(s: TrainingSetup, cfg: TrainConfig, step: int, signum: int, resume_hint: str | None,
             custom_data: bool) -> str:
    """How the run ended: the final snapshot, or the step a signal stopped it at and the command that resumes it."""
    if not signum:
        extra = f" and {s.run_dir / '3dpe.pt'}" if cfg.export_3dpe else ""
        return f"done at step {step}: {s.run_dir / 'final'}{extra}"
    if resume_hint is None:  # `main` called from code: the run's own resolved config resumes it
        resume_hint = "the same command with --resume" if custom_data else \
            resume_command(str(s.run_dir / "config.yaml"), [])
    return (f"stopped at step {step} by {signal_name(signum)}; checkpoint {st.checkpoint_dir(s.ckpt_root, step)}; "
            f"resume with: {resume_hint}")


def run(config_path: str | None, overrides: list[str] = ()) -> TrainResult:
    """Load the config (`configs/train.yaml` + key=value overrides) and train; SIGINT/SIGTERM stop it cleanly
    (`TrainResult.exit_code`: 128 + the signal)."""
    cfg = load_config(TrainConfig, config_path, list(overrides))
    try:
        return main(cfg, resume_hint=resume_command(config_path, overrides))
    finally:
        du.destroy_distributed()


if __name__ == "__main__":
    import sys

    run(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:])
