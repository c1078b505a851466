"""The training run's settings: `TrainConfig` and its sections (`configs/train.yaml` fills them).

    cfg = load_config(TrainConfig, "configs/train.yaml", ["optim.lr=2e-4", "name=run1"])

`configs/train.yaml` holds the released run's values, `configs/train_tiny.yaml` the tiny test models;
the `loss` section is `training.losses.LossConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from models.editing.editing_encoder import PromptEncoderKind
from training.losses import LossConfig


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

    tiny: bool = False                          # tiny random-init models and loss nets (tests, smoke runs)
    init_checkpoint: str = "pretrained_models/encoder_render_LT_90000.pt"  # Live3D LT: teacher, student init, renderer
    student_checkpoint: str = ""                # start the student (+ renderer) from a 3DPE/project checkpoint
    mae_pretrain: str = ""                      # e.g. pretrained_models/mae_pretrain_vit_base.pth (MAE branch)
    prompt_encoder: PromptEncoderKind = "mae"
    text_prompt_prob: float = 0.5               # clip: chance that a sample's prompt is its instruction text
    clip_model: str = "ViT-B-16"                # clip: open_clip architecture
    clip_pretrained: str = "pretrained_models/open_clip_vit_b16.bin"  # clip: tower weights (file, folder or tag)
    trainable: list[str] = field(default_factory=lambda: ["Final_encoder", "Ref_encoder"])
    frozen_dropout: bool = False                # True: frozen ASPP dropout stays active, as in the original
    find_unused_parameters: bool = False        # DDP option (needed when a trainable branch can go unused)
    render_chunk: int = 0                       # >0: checkpointed student rendering, this many views per chunk

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "allow_random_init": "benchmarks set random_init in THREEDPE_TEST_HOOKS (utils/testing_hooks.py)"}


@dataclass
class OptimConfig:
    lr: float = 1e-4                            # AdamW over the trainable student parts
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    lr_d: float = 1e-5                          # Adam over the discriminator
    betas_d: tuple[float, float] = (0.5, 0.999)
    grad_clip: float = 0.0                      # max grad norm for student and D; 0 = off (the original)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: over the run's total steps
    warmup_steps: int = 0                       # linear warm-up of the student's lr (0 = none, the original)


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
    tqdm: bool = True                           # progress on stderr: a bar on a terminal, else a line per log_interval


@dataclass
class TrainConfig:
    name: str = "3dpe"
    exp_dir: str = "exps"
    seed: int = 42
    epochs: int = 200
    max_steps: int = 0                          # 0 = run `epochs` epochs
    device: str = ""                            # '' = CUDA (LOCAL_RANK) when present, else CPU
    bf16: bool = False                          # bf16 autocast for encoders and renderer
    compile: bool = False                       # torch.compile teacher, student, renderer and D (docs/training.md)
    keep_freed_memory: bool = True              # CPU + glibc: reuse freed memory (utils.device.keep_freed_cpu_memory)
    resume: str = ""                            # '' fresh | 'auto' newest checkpoint of this run | a checkpoint dir
    export_3dpe: bool = True                    # also write the original 3dpe.pt layout at the end
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    log: LogConfig = field(default_factory=LogConfig)

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "stop_after": "tests set stop_after in THREEDPE_TEST_HOOKS (utils/testing_hooks.py)"}
