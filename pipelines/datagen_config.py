"""Settings of training-data generation (`pipelines/datagen.py`): where portraits come from, how they are
edited and filtered, and how the run is spread over processes; plus the choice of edit types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from datasets.layout import EditType
from utils.errors import ConfigError

TINY = "tiny-random"  # model name that builds a tiny random model (tests, benchmarks)


@dataclass
class SourceConfig:
    """Where the portraits come from."""

    kind: Literal["eg3d", "photos"] = "eg3d"
    network: str = "pretrained_models/ffhqrebalanced512-128.pkl"  # EG3D checkpoint; "tiny-random" for tests
    seeds: str = "0-999"  # ranges and single seeds: "0-999", "0-9,100,200-299"
    truncation_psi: float = 0.7  # EG3D truncation (1 = none)
    truncation_cutoff: int | None = 14  # truncate the first this many ws layers (None = all)
    camera: Literal["random-training", "frontal"] = "random-training"  # random-training: one draw per sample
    camera_seed: int = 0  # the camera of seed s is drawn from a generator seeded with camera_seed + s
    photos_dir: str = ""  # kind=photos: aligned portraits + dataset.json (EG3D label format)
    resolution: int = 512  # photos are resized to this when they differ
    dir_name: str = "eg3d"  # input folder name (photos: "photos"); no '_', the original reader splits at '_'
    files_per_dir: int = 0  # >0: inputs go to <dir_name>00000, <dir_name>00001, ... (this many each)
    keep_latents: bool = False  # EG3D: save z, ws, camera, seed under OUT/latents/


@dataclass
class EditConfig:
    """InstructPix2Pix settings; every combination of the lists below is one variant per (input, style)."""

    vocabulary: str = "configs/edit_vocabulary.yaml"  # edit types: instructions and CLIP captions
    edit_types: list[str] = field(default_factory=lambda: ["all"])  # names from the vocabulary, or ["all"]
    instructions_per_edit: int = 1  # phrasings drawn per (input, style), without replacement
    model: str = "timbrooks/instruct-pix2pix"  # hub id or local folder; "tiny-random" for tests
    steps: int = 20  # diffusion steps
    guidance_scales: list[float] = field(default_factory=lambda: [7.5])  # text guidance, one variant each
    image_guidance_scales: list[float] = field(default_factory=lambda: [1.5])  # image guidance, one variant each
    seeds_per_variant: int = 1  # diffusion seeds per (guidance, image guidance) pair
    seed: int = 0  # base of the per-(input, style, variant) diffusion seeds
    resolution: int = 512  # InstructPix2Pix working resolution


@dataclass
class FilterConfig:
    """CLIP filtering of failed edits (the InstructPix2Pix paper's idea)."""

    enabled: bool = True  # False: no CLIP scores, every edit passes
    clip_model: str = "ViT-B-16"  # open_clip name; "tiny-random" for tests
    clip_pretrained: str | None = None  # local open_clip weights file; None = pretrained_models/open_clip_vit_b16.bin
    min_directional: float = 0.15  # cos(image change, caption change)
    min_image_similarity: float = 0.7  # cos(source image, edit) — the edit must keep the identity
    on_all_filtered: Literal["skip", "keep-best"] = "skip"  # skip: no edit written; keep-best: the best one anyway


@dataclass
class DatagenConfig:
    """One data-generation run (configs/datagen.yaml: the full-size one); its sections above."""

    source: SourceConfig = field(default_factory=SourceConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output_dir: str = "data/3dpe_ours/train"  # the dataset folder (3DPE layout + manifest.jsonl, docs/data.md)
    batch_size: int = 4  # inputs handled per step (per model call too when batch_invariant is false)
    batch_invariant: bool = True  # model calls one sample at a time: outputs independent of batching and sharding
    threads: int = 1  # torch intra-op CPU threads per rank (torch.set_num_threads); 0 = leave the launcher's
    device: str = "auto"  # auto → cuda:LOCAL_RANK when CUDA is present, else cpu
    fp16: bool = True  # fp16 InstructPix2Pix on CUDA (ignored on CPU)
    distributed: str = "auto"  # auto: a process group when WORLD_SIZE>1 and MASTER_ADDR is set | on | off (a bare YAML off = off)
    dist_timeout_hours: float = 72.0  # how long finished ranks wait for the others at the final barrier
    progress: bool = True  # tqdm bar on rank 0


def select_edit_types(vocab: dict[str, EditType], names: Sequence[str]) -> list[EditType]:
    """The vocabulary's edit types named in `names` (in that order, repeats dropped), or all for ["all"] / []."""
    if not names or list(names) == ["all"]:
        return list(vocab.values())
    unknown = [n for n in names if n not in vocab]
    if unknown:
        raise ConfigError(f"unknown edit types {unknown}; known: {', '.join(vocab)}")
    return [vocab[n] for n in dict.fromkeys(names)]
