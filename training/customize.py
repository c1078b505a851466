"""`customize`: adapt a trained 3DPE model to a new user style from ~10 pairs, in minutes.

    python train_scripts.py customize --pairs DIR --base pretrained_models/3dpe.pt [--name my_style]
    python train_scripts.py customize --pairs DIR --base CKPT --instruction "turn him into a bronze statue"

DIR layout: `DIR/input/<stem>.png` and `DIR/edited/<stem>.png` (same stems), optional `DIR/dataset.json`
with EG3D labels (`{"labels": [["input/<stem>.png", [25 floats]], ...]}`; keys `input/<stem>.png`,
`<stem>.png` or `<stem>`); without labels every input gets the frontal camera (fx = fy = 4.2647).
With `--instruction`, only `DIR/input/` is needed: the edits are made once by InstructPix2Pix and cached
in `exps/<name>/edited/`. The run is the ordinary training loop (training/train.py) started from `--base`,
with the same teacher (Live3D LT) and losses; the result is `exps/<name>/final/` (project format), which
`test_scripts.py` / `PortraitEditor.from_pretrained` load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.train import TrainConfig, TrainResult, main as train_main
from utils.config import load_config
from utils.errors import ConfigError


def _customize_train_defaults() -> TrainConfig:
    cfg = TrainConfig(name="custom", epochs=100000, max_steps=300, export_3dpe=False)
    cfg.data.val_root = ""
    cfg.data.val_fraction = 0.0
    cfg.data.workers = 2
    cfg.model.mae_pretrain = ""
    cfg.optim.lr = 5e-5
    cfg.log.log_interval = 10
    cfg.log.image_interval = 50
    cfg.log.val_interval = 10**9
    cfg.log.save_interval = 100
    cfg.log.keep_last = 1
    return cfg


@dataclass
class CustomizeConfig:
    """Customisation run: where the pairs are, which model to start from, and the (short) training."""

    pairs: str = ""
    base: str = "pretrained_models/3dpe.pt"
    instruction: str = ""                       # non-empty: edit DIR/input/ with InstructPix2Pix
    ip2p: dict = field(default_factory=dict)    # fields of pipelines.instruct_pix2pix.InstructPix2PixConfig
    default_focal: float = 4.2647               # FOCAL_EG3D_LABEL, for inputs without a label
    train: TrainConfig = field(default_factory=_customize_train_defaults)


def _label_for(labels: dict[str, list[float]], stem: str, name: str) -> list[float] | None:
    for key in (f"input/{name}", name, stem, f"input/{stem}"):
        if key in labels:
            return labels[key]
    return None


class CustomPairs(Dataset):
    """Pairs in DIR/input + an edited folder, held in memory (they are few).

    Item: `input`, `target` 3×R×R in [-1,1]; `reference` = the edit of another pair (drawn from
    (seed, epoch, index); the target itself only for a single pair); `camera` (25,).
    """

    def __init__(self, input_dir: str | Path, edited_dir: str | Path, resolution: int = 512,
                 labels_file: str | Path | None = None, default_focal: float = 4.2647, seed: int = 0):
        from PIL import Image

        from utils.cameras import frontal_camera
        from utils.image_io import list_images, load_image, pil_to_tensor

        input_dir, edited_dir = Path(input_dir), Path(edited_dir)
        labels: dict[str, list[float]] = {}
        if labels_file is not None and Path(labels_file).is_file():
            raw = json.loads(Path(labels_file).read_text())
            raw = raw.get("labels", raw) if isinstance(raw, dict) else raw
            labels = dict(raw) if isinstance(raw, list) else {str(k): v for k, v in raw.items()}
        edited = {p.stem: p for p in list_images(edited_dir)} if edited_dir.is_dir() else {}
        self.stems: list[str] = []
        inputs, targets, cameras = [], [], []
        frontal = frontal_camera(default_focal)[0]

        def read(path: Path) -> torch.Tensor:
            img = load_image(path)
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
            return pil_to_tensor(img)[0]

        for p in list_images(input_dir):
            if p.stem not in edited:
                continue
            self.stems.append(p.stem)
            inputs.append(read(p))
            targets.append(read(edited[p.stem]))
            label = _label_for(labels, p.stem, p.name)
            cameras.append(torch.tensor(label, dtype=torch.float32) if label is not None else frontal.clone())
        if not self.stems:
            raise ConfigError(f"no pairs: '{input_dir}' and '{edited_dir}' share no image stems "
                              "(expected input/<stem>.png and edited/<stem>.png)")
        self.inputs, self.targets, self.cameras = inputs, targets, cameras
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
                "camera": self.cameras[index]}


def make_edits(input_dir: Path, out_dir: Path, instruction: str, editor: Any, resolution: int) -> Path:
    """Edit every image of `input_dir` with `editor(images, instruction, seeds)` into `out_dir` (cached)."""
    from PIL import Image

    from utils.image_io import list_images, load_image, pil_to_tensor, save_png

    todo = [p for p in list_images(input_dir) if not (out_dir / f"{p.stem}.png").is_file()]
    for i, p in enumerate(todo):
        img = load_image(p)
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        edited = editor(pil_to_tensor(img), [instruction], seeds=[i])
        save_png(out_dir / f"{p.stem}.png", edited[0])
    return out_dir


def main(cfg: CustomizeConfig, editor: Any = None) -> TrainResult:
    """Build the pairs (editing them first when an instruction is given) and fine-tune from `cfg.base`."""
    if not cfg.pairs:
        raise ConfigError("customize: --pairs DIR is required")
    pairs = Path(cfg.pairs)
    input_dir = pairs / "input"
    if not input_dir.is_dir():
        raise ConfigError(f"customize: '{input_dir}' does not exist (expected DIR/input/<stem>.png)")
    t = cfg.train
    if cfg.base:
        t.model.student_checkpoint = cfg.base
    run_dir = Path(t.exp_dir) / t.name
    edited_dir = pairs / "edited"
    if cfg.instruction:
        from utils.distributed import barrier, init_distributed

        edited_dir = run_dir / "edited"
        if init_distributed(t.device or None).is_main:  # the other ranks wait for rank 0's edits
            if editor is None:
                from pipelines.instruct_pix2pix import InstructPix2PixConfig, InstructPix2PixEditor
                from utils.config import from_dict

                editor = InstructPix2PixEditor(from_dict(InstructPix2PixConfig, dict(cfg.ip2p)),
                                               device=t.device or None)
            make_edits(input_dir, edited_dir, cfg.instruction, editor, t.data.resolution)
        barrier()
        (run_dir / "instruction.txt").write_text(cfg.instruction + "\n")
    elif not edited_dir.is_dir():
        raise ConfigError(f"customize: '{edited_dir}' does not exist; give DIR/edited/<stem>.png or --instruction")
    data = CustomPairs(input_dir, edited_dir, t.data.resolution, pairs / "dataset.json", cfg.default_focal, t.seed)
    data.card_data = {"source": str(pairs),  # for the model card (training/card.py)
                      "edits": f"InstructPix2Pix: {cfg.instruction}" if cfg.instruction else str(edited_dir)}
    if len(data) < t.data.batch_size:
        t.data.batch_size = len(data)
    return train_main(t, train_set=data, val_set=None)


def run(config_path: str | None, overrides: list[str] = (), *, pairs: str | None = None, base: str | None = None,
        instruction: str | None = None, name: str | None = None, editor: Any = None) -> TrainResult:
    """CLI entry: `configs/customize.yaml` + overrides; the flags win over the config."""
    from utils.distributed import destroy_distributed

    cfg = load_config(CustomizeConfig, config_path, list(overrides))
    if pairs is not None:
        cfg.pairs = pairs
    if base is not None:
        cfg.base = base
    if instruction is not None:
        cfg.instruction = instruction
    if name is not None:
        cfg.train.name = name
    try:
        return main(cfg, editor=editor)
    finally:
        destroy_distributed()
