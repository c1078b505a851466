"""The training run's settings: `TrainConfig` and its sections, the one place their defaults live.

    cfg = load_config(TrainConfig, "configs/train.yaml", ["optim.lr=2e-4", "name=run1"])

Every field's default and meaning are here (the comment on its line). A YAML in configs/ holds only the keys
it changes, each with its reason: `configs/train.yaml` the released run's two differences, `configs/train_tiny.yaml`
the tiny test models. `train_scripts.py train --config FILE --print-config` prints the resolved whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from models.editing.clip_prompt import DEFAULT_CLIP_WEIGHTS
from models.editing.editing_encoder import PromptEncoderKind


@dataclass
class DataConfig:
    """Where the pairs come from (EG3D/3DPE dataset layout, see datasets/pairs.py)."""

    train_root: str = "data/3dpe_dataset/train"  # folder of training pairs (docs/training.md "Data")
    val_root: str = "data/3dpe_dataset/test"   # "" → hold out `val_fraction` of the train portraits
    val_fraction: float = 0.05                  # used only when val_root is ""
    resolution: int = 512                       # side of the input, target and reference images
    batch_size: int = 2                         # per process (the original: 2 per GPU × 8)
    val_batch_size: int = 4                     # per process, during validation
    val_batches: int = 4                        # batches per validation pass per rank (0 = whole split)
    workers: int = 4                            # DataLoader worker processes per rank (0 = load in the main one)
    manifest: bool | None = None               # datasets.pairs.EditPairsDataset(manifest=...): None = when present


@dataclass
class ModelConfig:
    """Which networks, initialised from where, and what trains."""

    tiny: bool = False                          # tiny random-init models and loss nets (tests, smoke runs)
    init_checkpoint: str = "pretrained_models/encoder_render_LT_90000.pt"  # Live3D LT: teacher, student init, renderer
    student_checkpoint: str = ""                # start the student (+ renderer) from a 3DPE/project checkpoint
    mae_pretrain: str = ""                      # MAE weights for the MAE branch (configs/train.yaml: the official
                                                # ones); "" = a random MAE branch, as the original
    prompt_encoder: PromptEncoderKind = "mae"   # prompt branch: mae (reference image) | clip (image or text)
    text_prompt_prob: float = 0.5               # clip: chance that a sample's prompt is its instruction text
    clip_model: str = "ViT-B-16"                # clip: open_clip architecture
    clip_pretrained: str = DEFAULT_CLIP_WEIGHTS  # clip: tower weights (file, folder or tag)
    trainable: list[str] = field(default_factory=lambda: ["Final_encoder", "Ref_encoder"])  # student parts trained
    frozen_dropout: bool = False                # True: frozen ASPP dropout stays active, as in the original
    find_unused_parameters: bool = False        # DDP option (needed when a trainable branch can go unused)
    render_chunk: int = 0                       # >0: checkpointed student rendering, this many views per chunk
                                                # (0 = every view's graph kept, as the original)

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "allow_random_init": "benchmarks set random_init in THREEDPE_TEST_HOOKS (utils/testing_hooks.py)"}


@dataclass
class LossConfig:
    """Loss weights (defaults = the released 3DPE launch values) and where the loss nets' weights live.

    The distillation terms (training.losses.DistillationLoss) compare student and teacher: the triplanes, then
    the renders at the input camera and, with `multiview`, at a random camera.
    """

    tri: float = 1.0                            # L1 between student and teacher triplanes
    l1: float = 1.0                             # L1 of the final and the raw (neural-rendered) images
    lpips: float = 2.0                          # AlexNet LPIPS of the final and raw images (0 = no LPIPS net built)
    depth: float = 0.5                          # L1 of the depth maps
    feature: float = 0.0                        # L1 of the 32-channel feature images
    id: float = 0.0                             # ArcFace identity loss (0 = no ID net built)
    adv: float = 0.025                          # non-saturating GAN loss of the student's renders
    r1_gamma: float = 1.0                       # R1 penalty on the discriminator's real inputs (0 = off)
    multiview: bool = True                      # the same terms again at a random camera per sample
    one_camera_per_batch: bool = False          # True: one random camera for the whole batch (the original)
    weights_dir: str = "pretrained_models"      # where the AlexNet (LPIPS) and IR-SE50 (ID) weight files are

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        k: "model.tiny=true (or random_loss_nets in THREEDPE_TEST_HOOKS) builds random loss nets"
        for k in ("lpips_random_backbone", "id_random_init")}


@dataclass
class OptimConfig:
    """The student's and the discriminator's optimisers and the learning-rate schedule."""

    lr: float = 1e-4                            # AdamW over the trainable student parts
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW betas
    weight_decay: float = 0.01                  # AdamW weight decay
    lr_d: float = 1e-5                          # Adam over the discriminator
    betas_d: tuple[float, float] = (0.5, 0.999)  # Adam betas of the discriminator
    grad_clip: float = 0.0                      # max grad norm for student and D; 0 = off (the original)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: over the run's total steps
    warmup_steps: int = 0                       # linear warm-up of the student's lr (0 = none, the original)


@dataclass
class GanConfig:
    """The adversarial part: a reference-conditioned dual discriminator (models/discriminator.py)."""

    enabled: bool = True                        # False: no discriminator step and no GAN term
    start_step: int = 0                         # first step with GAN terms, counted from this run's start (not Live3D's)


@dataclass
class LogConfig:
    """What rank 0 logs and saves, and how often (in steps)."""

    log_interval: int = 200                     # scalars (TensorBoard) and the progress line
    image_interval: int = 2000                  # image grids
    val_interval: int = 2000                    # validation passes
    save_interval: int = 2000                   # checkpoints
    keep_last: int = 3                          # checkpoints kept (older ones are deleted; 0 = keep all)
    image_size: int = 256                       # tile side in logged grids
    tqdm: bool = True                           # progress on stderr: a bar on a terminal, else a line per log_interval


@dataclass
class TrainConfig:
    """One training run (`exps/<name>/`); its sections below."""

    name: str = "3dpe"                          # run name: the run folder is <exp_dir>/<name>
    exp_dir: str = "exps"                       # where run folders go
    seed: int = 42                              # models built from it on every rank; rank r draws seed + 1000003·r
    epochs: int = 200                           # passes over the training pairs (when max_steps is 0)
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
        "stop_after": "stop a run with SIGTERM or Ctrl-C: it saves that step (docs/training.md, Stopping)"}
