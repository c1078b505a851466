"""Everything the training loop needs, built once: networks, data, optimisers, DDP wrappers, resume state.

    s = build_training(cfg)              # TrainingSetup; the loop in training/train.py only reads it

The order of the steps is part of the result: the networks are built right after `torch.manual_seed(seed)`
on every rank (so all ranks start equal), every rank then gets its own RNG stream, and a resumed run
restores the saved RNG states last, so nothing random happens between the restore and the first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from training import state as st
from training.card import training_card
from training.config import TrainConfig
from training.losses import DistillationLoss
from training.student import Student
from utils import distributed as du
from utils.errors import ConfigError
from utils.testing_hooks import hooks


# ============================================================================================ networks
def build_networks(cfg: TrainConfig) -> dict[str, Any]:
    """Teacher (Live3D LT), student (editing encoder), the one renderer, and the discriminator (CPU, fp32)."""
    from models.checkpoint import load_checkpoint
    from models.discriminator import DiscriminatorConfig, EditingDualDiscriminator
    from models.editing.clip_prompt import ClipPromptConfig
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from models.live3d.encoder import Live3DConfig, Live3DEncoder

    m = cfg.model
    if m.tiny:
        enc_cfg = EditingEncoderConfig.tiny(m.prompt_encoder)
        r_cfg = RendererConfig.tiny()
        t_cfg = enc_cfg.live3d
        d_cfg = DiscriminatorConfig.tiny(r_cfg.img_resolution)
    else:
        enc_cfg = EditingEncoderConfig(prompt_encoder=m.prompt_encoder, clip=ClipPromptConfig(model_name=m.clip_model))
        r_cfg = RendererConfig()
        t_cfg = Live3DConfig("LT")
        d_cfg = DiscriminatorConfig(img_resolution=r_cfg.img_resolution)
    teacher = Live3DEncoder(t_cfg)
    student = EditingEncoder(enc_cfg)
    renderer = TriplaneRenderer(r_cfg)
    D = EditingDualDiscriminator(d_cfg)
    source: dict[str, Any] = {"init_checkpoint": "", "student_checkpoint": "", "mae_pretrain": ""}

    if m.init_checkpoint:
        live3d = load_checkpoint(m.init_checkpoint)
        teacher.load_state_dict(live3d.components["encoder"], strict=True)
        renderer.load_state_dict(live3d.components["renderer"], strict=True)
        student.load_live3d_init(live3d.components["encoder"])
        source["init_checkpoint"] = str(m.init_checkpoint)
    elif not (m.tiny or hooks().random_init):
        raise ConfigError("model.init_checkpoint is empty: the full-size models need the Live3D LT checkpoint "
                          "(pretrained_models/encoder_render_LT_90000.pt) for the teacher and the renderer")
    if m.mae_pretrain:
        if m.prompt_encoder != "mae":
            raise ConfigError("model.mae_pretrain is set but model.prompt_encoder is not 'mae'")
        student.prompt_encoder.load_official_mae(m.mae_pretrain)
        source["mae_pretrain"] = str(m.mae_pretrain)
    if m.prompt_encoder == "clip" and m.clip_pretrained and not m.tiny:
        # Tower weights are loaded here, not through the config: the snapshot holds them, so inference needs no file.
        from models.editing.clip_prompt import load_open_clip_weights

        source["clip_pretrained"] = load_open_clip_weights(student.prompt_encoder.clip, m.clip_model,
                                                           m.clip_pretrained)
    if m.student_checkpoint:
        base = load_checkpoint(m.student_checkpoint)
        student.load_state_dict(base.components["encoder"], strict=True)
        if "renderer" in base.components:
            renderer.load_state_dict(base.components["renderer"], strict=True)
        if "discriminator" in base.components:
            D.load_state_dict(base.components["discriminator"], strict=True)
        source["student_checkpoint"] = str(m.student_checkpoint)
    return {"teacher": teacher, "student": student, "renderer": renderer, "D": D,
            "configs": {"encoder": enc_cfg, "renderer": r_cfg, "discriminator": d_cfg}, "source": source}


def set_trainable(student: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """requires_grad only on the named top-level submodules of the student; returns those parameters."""
    student.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        sub = getattr(student, name, None)
        if sub is None:
            raise ConfigError(f"model.trainable: the student has no submodule '{name}'")
        sub.requires_grad_(True)
        params += [p for p in sub.parameters() if p.requires_grad]
    # Like the original (which calls requires_grad_(True) on the whole encoder), this includes MAE's
    # sin-cos pos_embed: the released weights carry a trained one.
    return params


def set_modes(student: nn.Module, trainable: list[str], frozen_dropout: bool,
              teacher: nn.Module | None = None) -> None:
    """Trainable submodules in train mode; frozen ones, and the teacher, in eval (or in train with
    `frozen_dropout`, which keeps the original's ASPP dropout: it never put either in eval mode)."""
    student.train()
    for name, sub in student.named_children():
        if name not in trainable:
            sub.train(frozen_dropout)
    if teacher is not None:
        teacher.train(frozen_dropout)


# ============================================================================================ data
def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) from `cfg.data`: two roots, or one root split by portrait."""
    from datasets.pairs import EditPairsDataset, split

    d = cfg.data
    for key, root in (("data.train_root", d.train_root), ("data.val_root", d.val_root or None)):
        if root is not None and not (Path(root) / "dataset.json").is_file():
            raise ConfigError(f"{key}='{root}' holds no dataset.json: pass {key}=DIR, a folder of edit pairs "
                              "with its dataset.json (make a tiny one with `python train_scripts.py datagen --config "
                              "configs/datagen_tiny.yaml`; docs/data.md)")
    train = EditPairsDataset(d.train_root, manifest=d.manifest, resolution=d.resolution, seed=cfg.seed)
    if d.val_root:
        val = EditPairsDataset(d.val_root, manifest=d.manifest, resolution=d.resolution, seed=cfg.seed)
    elif d.val_fraction > 0:
        train, val = split(train, d.val_fraction, seed=cfg.seed)
    else:
        val = None
    return train, val


class IndexedEpochs(Dataset):
    """Wraps a dataset so the sampler can pass (epoch, index): the item's random draws follow the epoch."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        item = self.base[index]
        out = {k: item[k] for k in ("input", "target", "reference", "camera")}
        out["instruction"] = str(item.get("instruction") or item.get("edit_type") or "")
        return out


class InfiniteSampler(Sampler):
    """(epoch, index) forever, starting at batch `start_batch` of epoch `start_epoch`; resumable exactly.

    Each epoch is this rank's share of `DistributedSampler`'s shuffle for that epoch (seeded by seed + epoch),
    cut to `batches_per_epoch` whole batches of `batch_size` (the tail that fills no batch is dropped, per
    epoch), so batch k of the stream is batch k % batches_per_epoch of epoch start + k // batches_per_epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int,
                 start_epoch: int = 0, start_batch: int = 0, shuffle: bool = True):
        super().__init__()
        self.order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.batches_per_epoch = self.order.num_samples // batch_size
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.start_epoch, self.start_batch * self.batch_size
        while True:
            self.order.set_epoch(epoch)
            for index in list(self.order)[skip:self.batches_per_epoch * self.batch_size]:
                yield epoch, index
            epoch, skip = epoch + 1, 0


# ============================================================================================ optimisers
def lr_lambda(schedule: str, total: int, warmup: int = 0) -> Callable[[int], float]:
    """The student's learning-rate factor per step: 'constant' (1) or 'cosine' (1 → 0 over `total` steps),
    times a linear warm-up (s + 1) / `warmup` over the first `warmup` steps (0 = none).

    `schedule` is `OptimConfig.schedule`, whose type admits only these two (checked when the config loads).
    """
    base = {"constant": lambda s: 1.0,
            "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))}[schedule]
    if warmup <= 0:
        return base
    return lambda s: base(s) * min(1.0, (s + 1) / warmup)


# ============================================================================================ the setup
@dataclass
class TrainingSetup:
    """What `build_training` hands the loop. Modules live on `device`; the start point is where to go on."""

    info: du.DistInfo
    device: torch.device
    run_dir: Path
    ckpt_root: Path
    resume_dir: Path | None          # the checkpoint this run resumed from
    teacher: nn.Module               # frozen Live3D LT
    encoder: nn.Module               # the student's editing encoder
    renderer: nn.Module              # frozen, shared by teacher and student
    D: nn.Module                     # EditingDualDiscriminator
    student: Student                 # Student(encoder, renderer)
    student_ddp: nn.Module           # student, DDP-wrapped when distributed
    D_ddp: nn.Module                 # D, DDP-wrapped when distributed
    loss_fn: DistillationLoss
    trainable: list[nn.Parameter]    # the student's parameters in opt_g
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    loader: DataLoader               # infinite: batches from (epoch, position) on, never ends
    val_set: Dataset | None
    cam_gen: torch.Generator         # this rank's random cameras (and CLIP text/image draws)
    steps_per_epoch: int
    total_steps: int
    configs: dict[str, Any]          # architecture configs: encoder, renderer, discriminator
    source: dict[str, Any]           # provenance written into every snapshot
    card: dict[str, Any] | None      # model-card facts (rank 0; training/card.py), None on other ranks
    step: int                        # steps done so far
    epoch: int                       # the epoch of the next batch
    position: int                    # batches of that epoch already done
    restarts: int = 0                # torchrun restarts of the worker group so far (0: a first launch)


def resume_target(cfg: TrainConfig, ckpt_root: Path, restarts: int = 0) -> Path | None:
    """The checkpoint directory to resume from: none, the newest of this run ('auto'), or a named one.

    `restarts` > 0 (torchrun restarted the workers, `du.restart_count()`) without a `resume` acts as 'auto':
    the restarted group goes on from the newest complete checkpoint, or starts from scratch when there is none.
    """
    if cfg.resume == "auto" or (restarts > 0 and not cfg.resume):
        return st.latest_checkpoint(ckpt_root)
    if cfg.resume:
        resume_dir = Path(cfg.resume)
        if not (resume_dir / st.STATE_FILE).is_file():
            raise ConfigError(f"resume: '{resume_dir}' is not a checkpoint directory (no {st.STATE_FILE})")
        return resume_dir
    return None


def agreed_resume_target(cfg: TrainConfig, ckpt_root: Path, restarts: int = 0) -> Path | None:
    """`resume_target` on every rank, checked to be the same checkpoint (call on all ranks).

    Each rank resolves the resume on its own filesystem. Ranks that find different checkpoints (or where
    one finds none or fails) would train from different states and stop at different steps, so every rank
    raises the same ConfigError instead: all nodes must see the run folder at the same path.
    """
    target: Path | None = None
    try:
        target = resume_target(cfg, ckpt_root, restarts)
        mine: tuple[str | None, str | None] = (None if target is None else str(target), None)
    except ConfigError as e:
        mine = (None, str(e))
    seen = du.all_gather_object(mine)
    if len(seen) == 1 or all(s == seen[0] for s in seen):
        if mine[1] is not None:
            raise ConfigError(mine[1])
        return target
    found = ", ".join(f"rank {r}: {path or err or 'no checkpoint'}" for r, (path, err) in enumerate(seen))
    raise ConfigError(f"resume: the ranks see different checkpoints ({found}); every node must see the run "
                      f"folder {ckpt_root.parent} at the same path (a shared filesystem)")


def compile_networks(*modules: nn.Module, backend: str = "inductor") -> None:
    """`torch.compile` each module's forward in place, one graph each (`fullgraph=True`: a graph break is an
    error, not a silent slow path); parameters and state dicts keep their names. Inside the compiled graphs the
    memory-saving autograd Functions of the eager step (FrozenDecode, the compact leaky ReLU) give way to plain
    autograd ops, whose saved tensors the compiler plans itself; the values are the same. The R1 pass stays eager
    (`training.losses.d_real_loss_r1`): compiled graphs have no double backward."""
    for module in modules:
        module.compile(fullgraph=True, backend=backend)


def build_training(cfg: TrainConfig, train_set: Dataset | None = None,
                   val_set: Dataset | None = None) -> TrainingSetup:
    """Build (or resume) everything; `train_set`/`val_set` replace the config's data (customize uses this)."""
    from models.checkpoint import load_checkpoint

    info = du.init_distributed(cfg.device or None)
    device = info.device
    if cfg.keep_freed_memory:
        from utils.device import keep_freed_cpu_memory

        keep_freed_cpu_memory(device)  # a CPU step frees and re-allocates ~100 MB tensors all the time
    run_dir = Path(cfg.exp_dir) / cfg.name
    ckpt_root = run_dir / "checkpoints"
    # A node that torchrun restarted because another node failed keeps its count: any rank's restart counts.
    restarts = max(du.all_gather_object(du.restart_count()))
    resume_dir = agreed_resume_target(cfg, ckpt_root, restarts)  # decided before anything random happens
    if restarts and info.is_main:
        print(f"[train] torchrun restart {restarts}: " + (f"resuming from {resume_dir}" if resume_dir is not None
              else "no complete checkpoint yet, starting from scratch"), flush=True)

    # ---- networks: built from the same seed on every rank, then each rank gets its own stream
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg)
    loss_fn = DistillationLoss(cfg.loss, random_nets=cfg.model.tiny or hooks().random_loss_nets).to(device)
    teacher, encoder, renderer, D = nets["teacher"], nets["student"], nets["renderer"], nets["D"]
    teacher.eval().requires_grad_(False).to(device)
    renderer.eval().requires_grad_(False).to(device)
    trainable = set_trainable(encoder, cfg.model.trainable)
    student = Student(encoder, renderer, cfg.model.render_chunk).to(device)
    D.to(device).requires_grad_(True)
    if resume_dir is not None:  # the whole encoder as it was (frozen parts included); the trainable state below
        snapshot = load_checkpoint(resume_dir)
        encoder.load_state_dict(snapshot.components["encoder"], strict=True)
        renderer.load_state_dict(snapshot.components["renderer"], strict=True)
    du.seed_everything(cfg.seed, info.rank)
    if cfg.compile:  # with the weights in place, before DDP wraps them
        compile_networks(teacher, student, renderer, D)

    # No buffer broadcast per forward; gradients in their parameters' layout (du.wrap_ddp says why).
    student_ddp = du.wrap_ddp(student, device, cfg.model.find_unused_parameters) if info.distributed else student
    D_ddp = du.wrap_ddp(D, device) if info.distributed else D

    opt_g = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                              weight_decay=cfg.optim.weight_decay)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, betas=tuple(cfg.optim.betas_d))

    # ---- data
    if train_set is None:
        train_set, val_set = build_datasets(cfg)
    order = InfiniteSampler(IndexedEpochs(train_set), info.world_size, info.rank, cfg.seed, cfg.data.batch_size)
    steps_per_epoch = order.batches_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set gives no full batch of {cfg.data.batch_size} per rank "
                          f"({len(train_set)} items, {info.world_size} ranks)")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    schedule = lr_lambda(cfg.optim.schedule, total_steps, cfg.optim.warmup_steps)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    cam_gen = torch.Generator().manual_seed(du.rank_seed(cfg.seed, info.rank) + 17)

    # ---- state
    step, epoch, position = 0, 0, 0
    if resume_dir is not None:
        step, epoch, position = st.restore_training_state(
            st.load_training_state(resume_dir), encoder=encoder, D=D, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g,
            rank=info.rank, world_size=info.world_size, generators={"cameras": cam_gen}, verbose=info.is_main)
    if position >= steps_per_epoch:  # saved with more batches per epoch (fewer ranks): that epoch is over
        epoch, position = epoch + 1, 0
    order.start_epoch, order.start_batch = epoch, position
    # DataLoader draws its worker seeds from this generator, not from the global RNG. Items depend only on
    # (seed, epoch, index), so the worker seeds never change a batch.
    loader_gen = torch.Generator().manual_seed(du.rank_seed(cfg.seed, info.rank) * 1009 + epoch)
    loader = DataLoader(IndexedEpochs(train_set), batch_size=cfg.data.batch_size, sampler=order,
                        num_workers=cfg.data.workers, pin_memory=device.type == "cuda", generator=loader_gen)
    return TrainingSetup(
        info=info, device=device, run_dir=run_dir, ckpt_root=ckpt_root, resume_dir=resume_dir, teacher=teacher,
        encoder=encoder, renderer=renderer, D=D, student=student, student_ddp=student_ddp, D_ddp=D_ddp, loss_fn=loss_fn,
        trainable=trainable, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, loader=loader, val_set=val_set,
        cam_gen=cam_gen, steps_per_epoch=steps_per_epoch, total_steps=total_steps, configs=nets["configs"],
        source=nets["source"], card=training_card(cfg, train_set, nets["source"]) if info.is_main else None,
        step=step, epoch=epoch, position=position, restarts=restarts)
