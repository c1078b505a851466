"""Distil the 3DPE editing module: the training loop, top to bottom in one file.

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

Resume is exact: the data order (DistributedSampler + a batch position), the per-item random draws
(seeded by (seed, epoch, index) in the dataset), the cameras (a generator per rank) and every RNG state
are checkpointed, so a run stopped after step k and resumed ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils import distributed as du
from training import state as st
from training.card import training_card
from training.losses import DistillationLoss, LossConfig, d_fake_loss, d_real_loss_r1, g_adv_loss
from utils.config import load_config, save_config, to_dict
from utils.errors import ConfigError


# ============================================================================================ config
@dataclass
class DataConfig:
    """Where the pairs come from (EG3D/3DPE dataset layout, see datasets/pairs.py)."""

    train_root: str = "data/3dpe_dataset/train"
    val_root: str = "data/3dpe_dataset/test"   # "" → hold out `val_fraction` of the train portraits
    val_fraction: float = 0.05
    resolution: int = 512
    batch_size: int = 2                         # per process (the original: 2 per GPU × 8)
    val_batch_size: int = 4
    val_batches: int = 4                        # batches per validation pass per rank (0 = whole split)
    workers: int = 4
    manifest: bool | None = None               # datasets.pairs.EditPairsDataset(manifest=...)


@dataclass
class ModelConfig:
    """Which networks, initialised from where, and what trains."""

    tiny: bool = False                          # tiny random-init models (tests)
    init_checkpoint: str = "pretrained_models/encoder_render_LT_90000.pt"  # Live3D LT: teacher, student init, renderer
    student_checkpoint: str = ""                # start the student (+ renderer) from a 3DPE/project checkpoint
    mae_pretrain: str = ""                      # e.g. pretrained_models/mae_pretrain_vit_base.pth (MAE branch)
    prompt_encoder: str = "mae"                 # 'mae' | 'clip'
    text_prompt_prob: float = 0.5               # clip: chance that a sample's prompt is its instruction text
    clip_model: str = "ViT-B-16"                # clip: open_clip architecture
    clip_pretrained: str = "pretrained_models/open_clip_vit_b16.bin"  # clip: tower weights (file, folder or tag)
    trainable: list[str] = field(default_factory=lambda: ["Final_encoder", "Ref_encoder"])
    frozen_dropout: bool = False                # True: frozen ASPP dropout stays active, as in the original
    find_unused_parameters: bool = False        # DDP option (needed when a trainable branch can go unused)
    allow_random_init: bool = False             # full-size models without init_checkpoint (benchmarks only)
    render_chunk: int = 0                       # >0: checkpointed student rendering, this many views per chunk


@dataclass
class OptimConfig:
    lr: float = 1e-4                            # AdamW over the trainable student parts
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    lr_d: float = 1e-5                          # Adam over the discriminator
    betas_d: tuple[float, float] = (0.5, 0.999)
    grad_clip: float = 0.0                      # max grad norm for student and D; 0 = off (the original)
    schedule: str = "constant"                  # 'constant' | 'cosine' (over max_steps)


@dataclass
class GanConfig:
    enabled: bool = True
    start_step: int = 0                         # counted from this run's start (not inherited from Live3D)


@dataclass
class LogConfig:
    log_interval: int = 200                     # scalars
    image_interval: int = 2000                  # image grids
    val_interval: int = 2000
    save_interval: int = 2000
    keep_last: int = 3
    image_size: int = 256                       # tile side in logged grids
    tqdm: bool = True


@dataclass
class TrainConfig:
    name: str = "3dpe"
    exp_dir: str = "exps"
    seed: int = 42
    epochs: int = 200
    max_steps: int = 0                          # 0 = run `epochs` epochs
    device: str = ""                            # '' = CUDA (LOCAL_RANK) when present, else CPU
    bf16: bool = False                          # bf16 autocast for encoders and renderer
    resume: str = ""                            # '' fresh | 'auto' newest checkpoint of this run | a checkpoint dir
    export_3dpe: bool = True                    # also write the original 3dpe.pt layout at the end
    stop_after: int = 0                         # stop (as if killed) after this step; 0 = off (tests, preemption)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class TrainResult:
    """What `main` hands back: the run directory, the last step and the trained modules (on their device)."""

    run_dir: Path
    step: int
    stopped: bool
    encoder: nn.Module
    renderer: nn.Module
    discriminator: nn.Module


# ============================================================================================ pieces
class Student(nn.Module):
    """The DDP-wrapped unit: editing encoder + the shared frozen renderer.

    forward(image N×3×R², reference N×3×R² in [-1,1], cameras V·N×25 (V = 1 or 2 views, view-major))
    → (triplane N×96×P×P, renders of the triplane at every camera: dict of V·N-batched tensors).
    """

    def __init__(self, encoder: nn.Module, renderer: nn.Module, render_chunk: int = 0):
        super().__init__()
        self.encoder = encoder
        self.renderer = renderer
        self.render_chunk = render_chunk

    def forward(self, image: torch.Tensor, reference: torch.Tensor, cameras: torch.Tensor,
                deterministic: bool = False, texts: list[str] | None = None,
                use_text: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if texts is None or use_text is None:
            tokens, bias = self.encoder.encode_prompt(reference=reference)
        else:
            tokens, bias = self.prompt_tokens(reference, texts, use_text)
        tri = self.encoder(image, tokens, bias)
        views = cameras.shape[0] // tri.shape[0]
        planes = tri if views == 1 else tri.repeat(views, 1, 1, 1)
        if not (self.render_chunk and torch.is_grad_enabled()):
            return tri, self.renderer(planes, cameras, deterministic=deterministic)
        # Activation checkpointing: keep only each chunk's inputs, recompute its renderer graph in backward
        # (same random draws: the RNG state is replayed). Peak memory: one chunk's graph instead of all views'.
        from torch.utils.checkpoint import checkpoint

        def render(p: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.renderer(p, c, deterministic=deterministic)
            return tuple(out[k] for k in RENDER_KEYS)

        parts = [checkpoint(render, planes[i:i + self.render_chunk], cameras[i:i + self.render_chunk],
                            use_reentrant=False) for i in range(0, planes.shape[0], self.render_chunk)]
        return tri, {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(RENDER_KEYS)}


    def prompt_tokens(self, reference: torch.Tensor, texts: list[str],
                      use_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP prompts, per sample either the instruction text (use_text[i]) or the reference image.

        Both are encoded for every sample (image tokens first, then text tokens) and the unused part is masked
        with a -inf attention bias, so every sample's attention sees exactly one prompt and both projections
        stay in the graph (DDP needs no unused-parameter search).
        """
        tokens, bias = self.encoder.encode_prompt(reference=reference, text=list(texts))
        n_img = self.encoder.prompt_encoder.num_image_tokens
        mask = torch.zeros_like(bias)
        t = use_text.to(bias.device, torch.bool)
        mask[t, :n_img] = float("-inf")
        mask[~t, n_img:] = float("-inf")
        return tokens, bias + mask


RENDER_KEYS = ("image", "image_raw", "image_depth", "feature_image")


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


class ResumableSampler(DistributedSampler):
    """DistributedSampler yielding (epoch, index) and able to start mid-epoch at batch `start_batch`."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int,
                 shuffle: bool = True, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.start_batch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start_batch * self.batch_size:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


def build_networks(cfg: TrainConfig) -> dict[str, Any]:
    """Teacher (Live3D LT), student (editing encoder), the one renderer, and the discriminator (CPU, fp32)."""
    from models.discriminator import DiscriminatorConfig, EditingDualDiscriminator
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
        enc_cfg = EditingEncoderConfig(prompt_encoder=m.prompt_encoder, clip={"model_name": m.clip_model})
        r_cfg = RendererConfig()
        t_cfg = Live3DConfig("LT")
        d_cfg = DiscriminatorConfig(img_resolution=r_cfg.img_resolution)
    teacher = Live3DEncoder(t_cfg)
    student = EditingEncoder(enc_cfg)
    renderer = TriplaneRenderer(r_cfg)
    D = EditingDualDiscriminator(d_cfg)
    source: dict[str, Any] = {"init_checkpoint": "", "student_checkpoint": "", "mae_pretrain": ""}

    if m.init_checkpoint:
        from models.checkpoint import load_checkpoint

        live3d = load_checkpoint(m.init_checkpoint)
        teacher.load_state_dict(live3d.components["encoder"], strict=True)
        renderer.load_state_dict(live3d.components["renderer"], strict=True)
        student.load_live3d_init(live3d.components["encoder"])
        source["init_checkpoint"] = str(m.init_checkpoint)
    elif not (m.tiny or m.allow_random_init):
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
        from models.checkpoint import load_checkpoint

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


def set_modes(student: nn.Module, trainable: list[str], frozen_dropout: bool) -> None:
    """Trainable submodules in train mode; frozen ones in eval (or train, to keep the original's dropout)."""
    student.train()
    for name, sub in student.named_children():
        if name not in trainable:
            sub.train(frozen_dropout)


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    from datasets.pairs import EditPairsDataset, split

    d = cfg.data
    train = EditPairsDataset(d.train_root, manifest=d.manifest, resolution=d.resolution, seed=cfg.seed)
    if d.val_root:
        val = EditPairsDataset(d.val_root, manifest=d.manifest, resolution=d.resolution, seed=cfg.seed)
    elif d.val_fraction > 0:
        train, val = split(train, d.val_fraction, seed=cfg.seed)
    else:
        val = None
    return train, val


def image_grid(columns: list[torch.Tensor], size: int) -> torch.Tensor:
    """Columns of N×3×H×W images in [-1,1] → one 3×(N·size)×(C·size) grid in [0,1] (rows = samples)."""
    tiles = [F.interpolate(c.detach().float().clamp(-1, 1), size=(size, size), mode="bilinear",
                           align_corners=False, antialias=True) for c in columns]
    rows = torch.cat(tiles, dim=3)                       # N×3×size×(C·size)
    return ((torch.cat(list(rows), dim=1) + 1) / 2).cpu()


def _lr_lambda(schedule: str, total: int):
    if schedule == "constant":
        return lambda s: 1.0
    if schedule == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
    raise ConfigError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")


def original_opts(cfg: TrainConfig) -> dict[str, Any]:
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


def _snapshot_writer(student: nn.Module, renderer: nn.Module, configs: dict, source: dict, step: int,
                     card: dict | None = None):
    def write(dst: Path) -> None:
        from models.checkpoint import save_pretrained
        from models.model_card import write_model_card

        save_pretrained(
            dst,
            components={"encoder": student.state_dict(), "renderer": renderer.state_dict()},
            model_type="3dpe",
            config={"encoder": to_dict(configs["encoder"]), "renderer": to_dict(configs["renderer"])},
            source={**source, "step": step, "trained_by": "training/train.py"},
        )
        if card is not None:  # the model card (README.md): training/card.py's facts + the step
            write_model_card(dst, steps=step, **card)
    return write


# ============================================================================================ the loop
def main(cfg: TrainConfig, train_set: Dataset | None = None, val_set: Dataset | None = None) -> TrainResult:
    """Train (or resume); `train_set`/`val_set` replace the config's data (customize uses this)."""
    info = du.init_distributed(cfg.device or None)
    device = info.device
    run_dir = Path(cfg.exp_dir) / cfg.name
    ckpt_root = run_dir / "checkpoints"

    # ---- resume target (decided before anything random happens)
    resume_dir: Path | None = None
    if cfg.resume == "auto":
        resume_dir = st.latest_checkpoint(ckpt_root)
    elif cfg.resume:
        resume_dir = Path(cfg.resume)
        if not (resume_dir / st.STATE_FILE).is_file():
            raise ConfigError(f"resume: '{resume_dir}' is not a checkpoint directory (no {st.STATE_FILE})")

    # ---- networks: built from the same seed on every rank, then each rank gets its own stream
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg)
    loss_fn = DistillationLoss(cfg.loss).to(device)
    teacher, encoder, renderer, D = nets["teacher"], nets["student"], nets["renderer"], nets["D"]
    teacher.eval().requires_grad_(False).to(device)
    renderer.eval().requires_grad_(False).to(device)
    trainable = set_trainable(encoder, cfg.model.trainable)
    student = Student(encoder, renderer, cfg.model.render_chunk).to(device)
    D.to(device).requires_grad_(True)
    if resume_dir is not None:  # the whole encoder as it was (frozen parts included), then the trainable state
        from safetensors.torch import load_file

        weights = load_file(str(resume_dir / "model.safetensors"))
        encoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("encoder.")}, strict=True)
        renderer.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("renderer.")}, strict=True)
    du.seed_everything(cfg.seed, info.rank)

    ddp_kwargs = dict(broadcast_buffers=False, find_unused_parameters=cfg.model.find_unused_parameters)
    if device.type == "cuda":
        ddp_kwargs["device_ids"] = [device.index]
    student_ddp = DDP(student, **ddp_kwargs) if info.distributed else student
    D_ddp = DDP(D, broadcast_buffers=False, **({"device_ids": [device.index]} if device.type == "cuda" else {})) \
        if info.distributed else D

    opt_g = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                              weight_decay=cfg.optim.weight_decay)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, betas=tuple(cfg.optim.betas_d))

    # ---- data
    if train_set is None:
        train_set, val_set = build_datasets(cfg)
    card = training_card(cfg, train_set, nets["source"]) if info.is_main else None  # model-card facts
    sampler = ResumableSampler(IndexedEpochs(train_set), info.world_size, info.rank, cfg.seed,
                               cfg.data.batch_size, shuffle=True)
    loader_gen = torch.Generator()  # keeps DataLoader's worker-seed draw off the global RNG

    def train_loader() -> DataLoader:
        return DataLoader(IndexedEpochs(train_set), batch_size=cfg.data.batch_size, sampler=sampler,
                          num_workers=cfg.data.workers, drop_last=True, pin_memory=device.type == "cuda",
                          generator=loader_gen, persistent_workers=False)

    steps_per_epoch = len(sampler) // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set gives no full batch of {cfg.data.batch_size} per rank "
                          f"({len(train_set)} items, {info.world_size} ranks)")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(cfg.optim.schedule, total_steps))
    cam_gen = torch.Generator().manual_seed(du.rank_seed(cfg.seed, info.rank) + 17)

    # ---- state
    step, epoch, position = 0, 0, 0
    if resume_dir is not None:
        ts = st.load_training_state(resume_dir)
        st.load_trainable_state(encoder, ts["student"])
        D.load_state_dict(ts["discriminator"])
        opt_g.load_state_dict(ts["opt_g"])
        opt_d.load_state_dict(ts["opt_d"])
        sched_g.load_state_dict(ts["sched_g"])
        step, epoch, position = int(ts["step"]), int(ts["epoch"]), int(ts["position"])
        rngs = ts["rng"]
        if len(rngs) == info.world_size:
            st.restore_rng(rngs[info.rank], {"cameras": cam_gen})
        elif info.is_main:
            print(f"[train] resume: {len(rngs)} saved ranks != {info.world_size} now; RNG streams reseeded")

    writer = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "logs"), purge_step=step if resume_dir is not None else None)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if cfg.bf16 \
        else contextlib.nullcontext
    views = 2 if cfg.loss.multiview else 1
    trainable_names = list(cfg.model.trainable)

    def to_dev(batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def cameras_for(batch: dict, gen: torch.Generator) -> torch.Tensor:
        from utils.cameras import sample_training_cameras

        cams = [batch["camera"]]
        if views == 2:
            cams.append(sample_training_cameras(batch["camera"].shape[0], generator=gen).to(device))
        return torch.cat(cams)

    def d_sized(x: torch.Tensor) -> torch.Tensor:
        r = D.cfg.img_resolution
        return x if x.shape[-1] == r else F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False,
                                                        antialias=True)

    def teacher_views(target: torch.Tensor, cams: torch.Tensor, deterministic: bool) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), autocast():
            tri = teacher(target)
            return tri, renderer(tri.repeat(cams.shape[0] // tri.shape[0], 1, 1, 1), cams, deterministic=deterministic)

    def grid(batch: dict, s_views: dict, t_views: dict, n: int) -> torch.Tensor:
        k = min(n, 4)
        cols = [batch["input"][:k], batch["reference"][:k], t_views["image"][:k], s_views["image"][:k]]
        if views == 2:
            cols += [t_views["image"][n:n + k], s_views["image"][n:n + k]]
        return image_grid(cols, cfg.log.image_size)

    def validate() -> None:
        """Losses on the held-out split (deterministic rendering, fixed cameras), and one fixed grid."""
        if val_set is None or len(val_set) == 0:
            return
        vs = DistributedSampler(val_set, num_replicas=info.world_size, rank=info.rank, shuffle=False)
        vl = DataLoader(IndexedEpochs(val_set), batch_size=cfg.data.val_batch_size,
                        sampler=[(0, i) for i in vs], num_workers=0)
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        sums: dict[str, float] = {}
        count = 0
        encoder.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for bi, batch in enumerate(vl):
                if cfg.data.val_batches and bi >= cfg.data.val_batches:
                    break
                batch = to_dev(batch)
                n = batch["input"].shape[0]
                cams = cameras_for(batch, gen)
                with autocast():
                    s_tri, s_views = student(batch["input"], batch["reference"], cams, deterministic=True)
                t_tri, t_views = teacher_views(batch["target"], cams, deterministic=True)
                total, terms = loss_fn(s_tri, t_tri, s_views, t_views, n)
                for k, v in {"total": total, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                count += 1
                if bi == 0 and writer is not None:
                    writer.add_image("val/grid", grid(batch, s_views, t_views, n), step)
        set_modes(encoder, trainable_names, cfg.model.frozen_dropout)
        # Every rank reports the same keys; ranks without a batch report zeros with weight 0.
        keys = sorted(sums) if sums else []
        keys = du.broadcast_object(keys)
        means = du.all_reduce_mean({**{k: sums.get(k, 0.0) for k in keys}, "_count": float(count)}, device)
        if writer is not None and means.get("_count", 0) > 0:
            for k in keys:
                writer.add_scalar(f"val/{k}", means[k] / means["_count"], step)

    # ---- train
    set_modes(encoder, trainable_names, cfg.model.frozen_dropout)
    D.train()
    pbar = None
    if info.is_main and cfg.log.tqdm:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps, initial=step, desc=cfg.name, dynamic_ncols=True)
    done = step >= total_steps
    stopped = False
    while not done:
        sampler.set_epoch(epoch)
        sampler.start_batch = position
        loader_gen.manual_seed(du.rank_seed(cfg.seed, info.rank) * 1009 + epoch)
        for batch in train_loader():
            t0 = time.perf_counter()
            batch = to_dev(batch)
            n = batch["input"].shape[0]
            cams = cameras_for(batch, cam_gen)
            prompt_kw: dict = {}
            if cfg.model.prompt_encoder == "clip":  # each sample: its instruction text or the reference image
                use_text = torch.rand(n, generator=cam_gen) < cfg.model.text_prompt_prob
                prompt_kw = {"texts": list(batch["instruction"]), "use_text": use_text.to(device)}

            # Teacher: the 2D-edited target lifted to 3D, rendered at both cameras (no graph kept).
            t_tri, t_views = teacher_views(batch["target"], cams, deterministic=False)
            # Student: through the DDP wrapper so gradients are averaged over ranks.
            with autocast():
                s_tri, s_views = student_ddp(batch["input"], batch["reference"], cams, **prompt_kw)
            loss, terms = loss_fn(s_tri, t_tri, s_views, t_views, n)
            logs: dict[str, float] = {}

            gan_on = cfg.gan.enabled and cfg.loss.adv > 0 and step >= cfg.gan.start_step
            if gan_on:
                real, ref = d_sized(batch["target"]), d_sized(batch["reference"])
                fake = s_views["image"][:n].float()
                c_in = batch["camera"]
                # D step: real (+R1 on image and reference), then fake; each forward with its backward.
                D.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                loss_real, r1, logits_real = d_real_loss_r1(D_ddp, real, ref, c_in, cfg.loss.r1_gamma)
                loss_real.backward()
                loss_fake, logits_fake = d_fake_loss(D_ddp, fake, ref, c_in)
                loss_fake.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(D.parameters(), cfg.optim.grad_clip)
                opt_d.step()
                # G side: D frozen, gradients flow only into the student's image.
                D.requires_grad_(False)
                loss_gan = g_adv_loss(D, fake, ref, c_in)
                loss = loss + cfg.loss.adv * loss_gan
                terms["gan"] = loss_gan
                logs.update({"D/loss_real": loss_real.item(), "D/loss_fake": loss_fake.item(), "D/r1": r1.item(),
                             "D/logits_real": float(logits_real.mean()),
                             "D/logits_fake": float(logits_fake.mean())})

            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                logs["grad_norm/student"] = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip))
            opt_g.step()
            sched_g.step()
            step += 1
            position += 1

            # ---- logging (every rank joins the reductions)
            if step % cfg.log.log_interval == 0 or step == 1:
                scalars = {f"loss/{k}": v.item() for k, v in {"total": loss, **terms}.items()}
                scalars.update(logs)
                scalars = du.all_reduce_mean(scalars, device)
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(k, v, step)
                    writer.add_scalar("lr/student", opt_g.param_groups[0]["lr"], step)
                    writer.add_scalar("lr/discriminator", opt_d.param_groups[0]["lr"], step)
                    writer.add_scalar("time/step_seconds", time.perf_counter() - t0, step)
                    writer.add_scalar("progress/epoch", epoch, step)
            if writer is not None and step % cfg.log.image_interval == 0:
                writer.add_image("train/grid", grid(batch, s_views, t_views, n), step)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
            if step % cfg.log.val_interval == 0:
                validate()

            # ---- checkpoint
            last = step >= total_steps or (cfg.stop_after and step >= cfg.stop_after)
            if step % cfg.log.save_interval == 0 or last:
                rng_all = st.gather_rng({"cameras": cam_gen})
                if info.is_main:
                    ended_epoch = position >= steps_per_epoch
                    training_state = {
                        "step": step,
                        "epoch": epoch + 1 if ended_epoch else epoch,
                        "position": 0 if ended_epoch else position,
                        "student": st.trainable_state(encoder),
                        "discriminator": D.state_dict(),
                        "opt_g": opt_g.state_dict(),
                        "opt_d": opt_d.state_dict(),
                        "sched_g": sched_g.state_dict(),
                        "rng": rng_all,
                        "world_size": info.world_size,
                        "config": json.dumps(to_dict(cfg)),
                    }
                    st.save_checkpoint(ckpt_root, step, training_state,
                                       _snapshot_writer(encoder, renderer, nets["configs"], nets["source"], step, card),
                                       keep_last=cfg.log.keep_last)
                du.barrier()
            if last:
                stopped = bool(cfg.stop_after and step >= cfg.stop_after and step < total_steps)
                done = True
                break
        else:
            epoch += 1
            position = 0
            continue
        break

    # ---- finish: slim inference snapshot (+ the original 3dpe.pt layout)
    if info.is_main and not stopped:
        final = run_dir / "final"
        if final.exists():
            import shutil

            shutil.rmtree(final)
        _snapshot_writer(encoder, renderer, nets["configs"], nets["source"], step, card)(final)
        if cfg.export_3dpe:
            from models.checkpoint import export_original_3dpe

            export_original_3dpe(run_dir / "3dpe.pt", encoder.state_dict(), renderer.state_dict(),
                                 discriminator_sd=D.state_dict(), step=step, opts=original_opts(cfg))
    if pbar is not None:
        pbar.close()
    if writer is not None:
        writer.close()
    du.barrier()
    return TrainResult(run_dir, step, stopped, encoder, renderer, D)


def run(config_path: str | None, overrides: list[str] = ()) -> TrainResult:
    """Load the config (`configs/train.yaml` + key=value overrides) and train."""
    cfg = load_config(TrainConfig, config_path, list(overrides))
    try:
        return main(cfg)
    finally:
        du.destroy_distributed()


if __name__ == "__main__":
    import sys

    run(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:])
