"""`customize`: adapt a trained 3DPE model to a new user style from ~10 pairs, in minutes.

    python train_scripts.py customize --pairs DIR --base pretrained_models/3dpe.pt [--name my_style]
    python train_scripts.py customize --pairs DIR --base CKPT --instruction "turn him into a bronze statue"

DIR layout: `DIR/input/<stem>.png` and `DIR/edited/<stem>.png` (same stems), optional `DIR/dataset.json`
with EG3D labels (`{"labels": [["input/<stem>.png", [25 floats]], ...]}`; keys `input/<stem>.png`,
`<stem>.png` or `<stem>`); without labels every input gets the frontal camera (fx = fy = `FOCAL_EG3D_LABEL`, 4.2647).
With `--instruction`, only `DIR/input/` is needed: the edits are made once by InstructPix2Pix and cached
in `exps/<name>/edited/`. The run is the ordinary training loop (training/train.py) started from `--base`,
with the same teacher (Live3D LT) and losses; the result is `exps/<name>/final/` (project format), which
`test_scripts.py` / `PortraitEditor.from_pretrained` load.

Inputs without an edit are skipped with one warning; a missing or empty folder, or no input with an edit,
is a ConfigError naming the folder; a missing base checkpoint one naming `--base PATH` (override `base=PATH`).
The student takes the base's prompt encoder: with a CLIP base every sample's prompt is the instruction (when
given) or its reference image, never an empty text. `configs/customize_tiny.yaml` runs tiny random models on
CPU, 2 steps of a few seconds each (smoke runs, tests).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from models.checkpoint.files import DEFAULT_CHECKPOINT
from pipelines.instruct_pix2pix import InstructPix2PixConfig
from training.train import TrainConfig, TrainResult, main as train_main
from utils.cameras import FOCAL_EG3D_LABEL
from utils.config import load_config
from utils.errors import ConfigError, HubWeightsError, MissingWeightsError


def _customize_train_defaults() -> TrainConfig:
    """The customisation run's training defaults (the one place they live): TrainConfig's, except a short,
    validation-free run from a trained model (`--base`)."""
    cfg = TrainConfig(name="custom", epochs=100000, max_steps=300, export_3dpe=False)  # max_steps ends the run
    cfg.data.val_root = ""             # no validation: the few pairs all train
    cfg.data.val_fraction = 0.0
    cfg.data.workers = 2               # the pairs are held in memory (CustomPairs): little to load
    cfg.model.text_prompt_prob = 1.0   # CLIP base + --instruction: every sample's prompt is the instruction
    cfg.optim.lr = 5e-5                # half the training lr: fine-tuning a trained model
    cfg.log.log_interval = 10          # a short run: log, save and show images often
    cfg.log.image_interval = 50
    cfg.log.val_interval = 10**9       # never (no validation split)
    cfg.log.save_interval = 100
    cfg.log.keep_last = 1
    return cfg


@dataclass
class CustomizeConfig:
    """Customisation run: where the pairs are, which model to start from, and the (short) training."""

    pairs: str = ""                             # DIR with input/<stem>.png + edited/<stem>.png (+ dataset.json)
    base: str = DEFAULT_CHECKPOINT              # the trained model to start from (3dpe.pt or a project folder)
    instruction: str = ""                       # non-empty: edit DIR/input/ with InstructPix2Pix, not DIR/edited/
    ip2p: InstructPix2PixConfig = field(default_factory=InstructPix2PixConfig)  # the edits for `instruction`
    default_focal: float = FOCAL_EG3D_LABEL     # camera label focal (frontal) for inputs without a label
    train: TrainConfig = field(default_factory=_customize_train_defaults)  # the run; override as train.<key>=value


def _label_for(labels: dict[str, list[float]], stem: str, name: str) -> list[float] | None:
    for key in (f"input/{name}", name, stem, f"input/{stem}"):
        if key in labels:
            return labels[key]
    return None


class CustomPairs(Dataset):
    """Pairs in DIR/input + an edited folder (matched by file stem), held in memory (they are few).

    Item: `input`, `target` 3×R×R in [-1,1]; `reference` = the edit of another pair (drawn from
    (seed, epoch, index); the target itself only for a single pair); `camera` (25,); `instruction` (the
    text prompt of a CLIP student; "" = none, the reference image is the prompt).
    `unmatched`: the inputs without an edit (skipped; the caller warns once).
    Raises ConfigError when a folder holds no image or no input has an edit.
    """

    def __init__(self, input_dir: str | Path, edited_dir: str | Path, resolution: int = 512,
                 labels_file: str | Path | None = None, default_focal: float = FOCAL_EG3D_LABEL, seed: int = 0,
                 instruction: str = ""):
        from utils.cameras import frontal_camera
        from utils.image_io import load_image_tensor

        input_dir, edited_dir = Path(input_dir), Path(edited_dir)
        labels: dict[str, list[float]] = {}
        if labels_file is not None and Path(labels_file).is_file():
            raw = json.loads(Path(labels_file).read_text())
            raw = raw.get("labels", raw) if isinstance(raw, dict) else raw
            labels = dict(raw) if isinstance(raw, list) else {str(k): v for k, v in raw.items()}
        sources = _images_in(input_dir, "put the portraits there as <stem>.png")
        edited = {p.stem: p for p in _images_in(edited_dir, "put the edits there under the inputs' stems "
                                                            "(input/<stem>.png → edited/<stem>.png)")}
        self.stems: list[str] = []
        self.unmatched: list[str] = [p.name for p in sources if p.stem not in edited]
        inputs, targets, cameras = [], [], []
        frontal = frontal_camera(default_focal)[0]

        for p in sources:
            if p.stem not in edited:
                continue
            self.stems.append(p.stem)
            inputs.append(load_image_tensor(p, resolution)[0])
            targets.append(load_image_tensor(edited[p.stem], resolution)[0])
            label = _label_for(labels, p.stem, p.name)
            cameras.append(torch.tensor(label, dtype=torch.float32) if label is not None else frontal.clone())
        if not self.stems:
            raise ConfigError(f"customize: no image in '{input_dir}' has an edit of the same stem in '{edited_dir}' "
                              f"(inputs: {_some(p.name for p in sources)}; edits: "
                              f"{_some(p.name for p in edited.values())}); name each edit like its input, e.g. "
                              "input/a.png and edited/a.png")
        self.inputs, self.targets, self.cameras = inputs, targets, cameras
        self.instruction = instruction
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.stems)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.stems)
        ref = index
        if n > 1:
            ref = (index + 1 + int(np.random.default_rng([self.seed, self.epoch, index]).integers(n - 1))) % n
        return {"input": self.inputs[index], "target": self.targets[index], "reference": self.targets[ref],
                "camera": self.cameras[index], "instruction": self.instruction}


def _images_in(directory: Path, fix: str) -> list[Path]:
    """The images of `directory`; ConfigError (naming the folder and `fix`) when it is missing or has none."""
    from utils.image_io import IMAGE_EXTENSIONS, list_images

    if not directory.is_dir():
        raise ConfigError(f"customize: '{directory}' does not exist; create it and {fix}")
    images = list_images(directory)
    if not images:
        raise ConfigError(f"customize: '{directory}' holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}); {fix}")
    return images


def _some(names: Any, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def _adopt_base_prompt_encoder(t: TrainConfig, base: str) -> None:
    """Build the student with the base checkpoint's prompt encoder (MAE or CLIP), so its weights load.

    A CLIP base brings its towers, so no separate CLIP weight file is needed. A missing local base is a
    ConfigError naming `--base PATH` / `base=PATH`.
    """
    from models.checkpoint import load_checkpoint

    try:
        enc_cfg = load_checkpoint(base).configs.get("encoder")
    except HubWeightsError:
        raise  # its message names the Hub id and the download command
    except MissingWeightsError as e:
        raise ConfigError(f"customize: the base checkpoint '{base}' does not exist; pass the trained model to start "
                          "from with --base PATH (or the override base=PATH): 3dpe.pt (where to get it: "
                          "docs/checkpoints.md) or a project-format folder") from e
    kind = getattr(enc_cfg, "prompt_encoder", None)
    if kind is None:
        return
    t.model.prompt_encoder = kind
    if kind == "clip":
        t.model.clip_model = enc_cfg.clip.model_name
        t.model.clip_pretrained = ""


def make_edits(input_dir: Path, out_dir: Path, instruction: str, editor: Any, resolution: int) -> Path:
    """Edit every image of `input_dir` with `editor(images, instruction, seeds)` into `out_dir` (cached)."""
    from utils.image_io import list_images, load_image_tensor, save_png

    todo = [p for p in list_images(input_dir) if not (out_dir / f"{p.stem}.png").is_file()]
    for i, p in enumerate(todo):
        edited = editor(load_image_tensor(p, resolution), [instruction], seeds=[i])
        save_png(out_dir / f"{p.stem}.png", edited[0])
    return out_dir


def main(cfg: CustomizeConfig, editor: Any = None) -> TrainResult:
    """Build the pairs (editing them first when an instruction is given) and fine-tune from `cfg.base`.

    User errors (no --pairs, a missing or empty folder, no input with an edit, a missing base) raise ConfigError; inputs
    without an edit are skipped with one warning.
    """
    from utils.distributed import env_info, print_line

    if not cfg.pairs:
        raise ConfigError("customize: --pairs DIR is required (DIR/input/<stem>.png + DIR/edited/<stem>.png)")
    pairs = Path(cfg.pairs)
    if not pairs.is_dir():
        raise ConfigError(f"customize: --pairs '{pairs}' does not exist; give the folder that holds input/ "
                          "(and edited/)")
    input_dir = pairs / "input"
    _images_in(input_dir, "put the portraits there as <stem>.png")
    t = cfg.train
    run_dir = Path(t.exp_dir) / t.name
    edited_dir = run_dir / "edited" if cfg.instruction else pairs / "edited"
    labels = pairs / "dataset.json"
    data = None
    if not cfg.instruction:  # the folder problems come before any model is loaded
        if not edited_dir.is_dir():
            raise ConfigError(f"customize: '{edited_dir}' does not exist; put the edits there as edited/<stem>.png "
                              "(the inputs' stems), or pass --instruction TEXT to make them")
        data = CustomPairs(input_dir, edited_dir, t.data.resolution, labels, cfg.default_focal, t.seed)
    if cfg.base:
        t.model.student_checkpoint = cfg.base
        _adopt_base_prompt_encoder(t, cfg.base)  # also the first read of the base: a missing one fails here
    if cfg.instruction:
        from utils.distributed import barrier, init_distributed

        if init_distributed(t.device or None).is_main:  # the other ranks wait for rank 0's edits
            if editor is None:
                from pipelines.instruct_pix2pix import InstructPix2PixEditor

                editor = InstructPix2PixEditor(cfg.ip2p, device=t.device or None)
            make_edits(input_dir, edited_dir, cfg.instruction, editor, t.data.resolution)
        barrier()
        from utils.atomic import atomic_write_text

        atomic_write_text(run_dir / "instruction.txt", cfg.instruction + "\n")
        data = CustomPairs(input_dir, edited_dir, t.data.resolution, labels, cfg.default_focal, t.seed,
                           instruction=cfg.instruction)
    if data.unmatched and env_info()[0] == 0:
        print_line(f"warning: {len(data.unmatched)} of {len(data.unmatched) + len(data)} inputs in '{input_dir}' have "
                   f"no edit in '{edited_dir}' and are skipped: {', '.join(data.unmatched)}", file=sys.stderr)
    data.card_data = {"source": str(pairs),  # for the model card (training/card.py)
                      "edits": f"InstructPix2Pix: {cfg.instruction}" if cfg.instruction else str(edited_dir)}
    if len(data) < t.data.batch_size:
        t.data.batch_size = len(data)
    return train_main(t, train_set=data, val_set=None)


def resolve_config(config_path: str | None, overrides: Sequence[str] = (), *, pairs: str | None = None,
                   base: str | None = None, instruction: str | None = None,
                   name: str | None = None) -> CustomizeConfig:
    """The run's whole config: `CustomizeConfig` defaults ← the YAML at `config_path` ← `overrides` ← the flags
    (`--pairs`, `--base`, `--instruction`, `--name` = train.name), which win where given."""
    cfg = load_config(CustomizeConfig, config_path, list(overrides))
    if pairs is not None:
        cfg.pairs = pairs
    if base is not None:
        cfg.base = base
    if instruction is not None:
        cfg.instruction = instruction
    if name is not None:
        cfg.train.name = name
    return cfg


def run(config_path: str | None, overrides: list[str] = (), *, pairs: str | None = None, base: str | None = None,
        instruction: str | None = None, name: str | None = None, editor: Any = None) -> TrainResult:
    """CLI entry: `configs/customize.yaml` + overrides; the flags win over the config. Rank 0 prints where the
    customised model is."""
    from utils.distributed import destroy_distributed, env_info, print_line

    cfg = resolve_config(config_path, overrides, pairs=pairs, base=base, instruction=instruction, name=name)
    try:
        result = main(cfg, editor=editor)
    finally:
        destroy_distributed()
    final = result.run_dir / "final"
    if not result.stopped and env_info()[0] == 0 and final.is_dir():
        print_line(f"customized model: {final}/ (python test_scripts.py --checkpoint {final})")
    return result
