"""Checkpoints of a training run: atomic writes, keep the last K, everything an exact resume needs, and the
inference snapshot / original-format export written beside them.

Layout of a run directory (`exps/<name>/`):

    config.yaml                      the resolved TrainConfig
    logs/                            TensorBoard event files
    checkpoints/step_00001000/       one checkpoint = an inference snapshot + the training state
        config.json, model.safetensors   project format (models.checkpoint.save_pretrained)
        training_state.pt                student trainable params, D, optimizers, schedulers, step, epoch,
                                         sampler position, RNG states of every rank
    final/                           the snapshot written at the end
    3dpe.pt                          the original 3dpe.pt layout (export_3dpe), its architecture recorded

A checkpoint directory is built under a hidden temporary name and renamed into place
(`utils.atomic.atomic_directory`), and an old one is renamed out of sight before it is deleted, so a killed
run never leaves a half-written or half-deleted `step_*` behind; `latest_checkpoint` only sees complete ones
(which is what a torchrun restart resumes from), and the next save removes what a killed one left.
`training_state` writes `training_state.pt` and `restore_training_state` reads it back; `snapshot_writer`
writes the inference snapshot (into every checkpoint and into `final/`), `write_final` the end-of-run outputs.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from models.checkpoint.files import TRAINING_STATE_FILE as STATE_FILE
from utils.atomic import atomic_directory
from utils.config import to_dict

if TYPE_CHECKING:
    from training.config import TrainConfig

_STEP_RE = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------------------------- RNG
def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU, every CUDA device and the named generators.

    Everything is stored as tensors/ints/tuples so the file loads with `weights_only=True`.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng`; generators are restored in place (missing names are left as they are)."""
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def gather_rng(generators: dict[str, torch.Generator] | None = None) -> list[dict[str, Any]]:
    """Every rank's `capture_rng` in rank order (call on all ranks).

    States travel as `torch.save` bytes: gathering tensors inside pickled objects is fragile across torch
    versions, bytes are not.
    """
    import io

    from utils.distributed import all_gather_object

    buf = io.BytesIO()
    torch.save(capture_rng(generators), buf)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in all_gather_object(buf.getvalue())]


def _to_tuple(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuple(v) for v in x)
    return x


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, dir), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    training_state: dict[str, Any],
    write_snapshot: Callable[[Path], None],
    keep_last: int = 3,
) -> Path:
    """Write `root/step_XXXXXXXX/` atomically (snapshot via `write_snapshot(dir)` + training state).

    Call on rank 0 only. Older checkpoints beyond the newest `keep_last` are deleted (0 keeps all).
    """
    root, final = Path(root), checkpoint_dir(root, step)
    for stale in [*root.glob(".step_*.tmp"), *root.glob(".step_*.old-*")]:  # what a killed run left
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(final) as tmp:
        write_snapshot(tmp / "snapshot")
        # The snapshot writer owns its own folder (it may rename into place); move its files up.
        for f in (tmp / "snapshot").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "snapshot").rmdir()
        torch.save(training_state, tmp / STATE_FILE)
    if keep_last > 0:
        for _, old in list_checkpoints(root)[:-keep_last]:
            # Out of sight first: a kill during the delete leaves a hidden leftover, not a half-deleted step_*.
            aside = root / f".{old.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
    return final


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read `training_state.pt` from a checkpoint directory (or the file itself).

    CorruptCheckpointError (naming the file; the fix: resume from the previous checkpoint) when it is cut
    short or damaged.
    """
    from models.checkpoint.integrity import reading

    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    with reading(p):
        return torch.load(p, map_location=map_location, weights_only=True)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad=True, by name (CPU clones)."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the module's trainable parameters; names must match exactly."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:5]
        extra = sorted(set(state) - set(params))[:5]
        raise KeyError(f"trainable parameters differ from the checkpoint: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


# --------------------------------------------------------------------------------- training state
def training_state(*, step: int, epoch: int, position: int, encoder: nn.Module, D: nn.Module,
                   opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                   sched_g: torch.optim.lr_scheduler.LRScheduler, rng: list[dict[str, Any]], world_size: int,
                   cfg: "TrainConfig") -> dict[str, Any]:
    """The content of `training_state.pt`: (epoch, position) is where the next batch comes from, `rng` every
    rank's `capture_rng` (from `gather_rng`), `config` the run's TrainConfig as JSON."""
    return {
        "step": step,
        "epoch": epoch,
        "position": position,
        "student": trainable_state(encoder),
        "discriminator": D.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "sched_g": sched_g.state_dict(),
        "rng": rng,
        "world_size": world_size,
        "config": json.dumps(to_dict(cfg)),
    }


def restore_training_state(ts: dict[str, Any], *, encoder: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer,
                           opt_d: torch.optim.Optimizer, sched_g: torch.optim.lr_scheduler.LRScheduler, rank: int,
                           world_size: int, generators: dict[str, torch.Generator],
                           verbose: bool = True) -> tuple[int, int, int]:
    """Load `ts` (a `training_state` dict) into the modules, optimisers and this rank's RNGs (last, so nothing
    random runs in between); returns (step, epoch, position). With another world size the RNG streams stay
    as seeded (a note is printed when `verbose`)."""
    load_trainable_state(encoder, ts["student"])
    D.load_state_dict(ts["discriminator"])
    opt_g.load_state_dict(ts["opt_g"])
    opt_d.load_state_dict(ts["opt_d"])
    sched_g.load_state_dict(ts["sched_g"])
    rngs = ts["rng"]
    if len(rngs) == world_size:
        restore_rng(rngs[rank], generators)
    elif verbose:
        print(f"[train] resume: {len(rngs)} saved ranks != {world_size} now; RNG streams reseeded")
    return int(ts["step"]), int(ts["epoch"]), int(ts["position"])


# ------------------------------------------------------------------------------ snapshots, export
def snapshot_writer(encoder: nn.Module, renderer: nn.Module, configs: dict[str, Any], source: dict[str, Any],
                    step: int, card: dict[str, Any] | None = None) -> Callable[[Path], None]:
    """A `write(dir)` that saves encoder + renderer in the project format (what `save_checkpoint` and
    `PortraitEditor.from_pretrained` take); `configs` holds the 'encoder' and 'renderer' architecture configs.
    With `card` (training/card.py's facts) the folder also gets its model card (README.md)."""
    def write(dst: Path) -> None:
        from models.checkpoint import save_pretrained
        from models.checkpoint.model_card import write_model_card

        save_pretrained(
            dst,
            components={"encoder": encoder.state_dict(), "renderer": renderer.state_dict()},
            model_type="3dpe",
            config={"encoder": to_dict(configs["encoder"]), "renderer": to_dict(configs["renderer"])},
            source={**source, "step": step, "trained_by": "training/train.py"},
        )
        if card is not None:
            write_model_card(dst, steps=step, **card)
    return write


def write_final(run_dir: Path, encoder: nn.Module, renderer: nn.Module, D: nn.Module, configs: dict[str, Any],
                source: dict[str, Any], step: int, cfg: "TrainConfig", card: dict[str, Any] | None = None) -> None:
    """End of a run (rank 0): `run_dir/final/` (replaced if present) and, with `cfg.export_3dpe`, `run_dir/3dpe.pt`
    in the original 3DPE layout (encoder, renderer, discriminator, step, `original_opts(cfg)`) plus the
    architecture (`configs`: encoder, renderer, discriminator), so it loads back at any model size."""
    snapshot_writer(encoder, renderer, configs, source, step, card)(run_dir / "final")  # replaces it atomically
    if cfg.export_3dpe:
        from models.checkpoint import export_original_3dpe

        export_original_3dpe(run_dir / "3dpe.pt", encoder.state_dict(), renderer.state_dict(),
                             discriminator_sd=D.state_dict(), step=step, opts=original_opts(cfg),
                             configs={c: configs[c] for c in ("encoder", "renderer", "discriminator") if c in configs})


def original_opts(cfg: "TrainConfig") -> dict[str, Any]:
    """The run's settings under the original `TrainOptions` names (for the exported 3dpe.pt `opts`)."""
    return {
        "job_name": cfg.name, "exp_dir": cfg.exp_dir, "train_data_path": cfg.data.train_root,
        "val_data_path": cfg.data.val_root, "train_epoch": cfg.epochs, "batch_size": cfg.data.batch_size,
        "val_batch_size": cfg.data.val_batch_size, "seed": cfg.seed, "lr_D": cfg.optim.lr_d,
        "learning_rate_encoder": cfg.optim.lr, "optim_name_encoder": "adamw", "lpips_lambda": cfg.loss.lpips,
        "id_lambda": cfg.loss.id, "l1_lambda": cfg.loss.l1, "tri_lambda": cfg.loss.tri,
        "depth_lambda": cfg.loss.depth, "feature_lambda": cfg.loss.feature, "adv_lambda": cfg.loss.adv,
        "add_gan_loss_step": cfg.gan.start_step, "use_gan_loss": cfg.gan.enabled, "use_mul_loss": cfg.loss.multiview,
        "resume_path": cfg.model.init_checkpoint, "save_interval": cfg.log.save_interval,
        "val_interval": cfg.log.val_interval, "image_interval": cfg.log.image_interval,
        "print_interval": cfg.log.log_interval, "max_steps": cfg.max_steps,
    }
