"""The training reader: (portrait, edited portrait, reference of the same edit, instruction, camera).

Reads the 3DPE dataset layout (the released `3dpe_dataset/{train,test}` and what `pipelines/datagen.py` writes)::

    ROOT/dataset.json               {"labels": [["<dir>/<file>.png", [25 floats]], ...]}  one label per input
    ROOT/<dir>/<file>.png           inputs
    ROOT/<dir>_<style>/<file>.png   the input edited into <style>
    ROOT/manifest.jsonl             optional (ours): which edit belongs to which input, and its instruction

Without a manifest the original naming rules apply: inputs are the images whose relative path has no '_';
style folders are top-level folders with a '_', split at the first '_' into (<dir>, <style>). With a
manifest (its `kept` records) any file names work. One item per (input, style) pair that exists.

    ds = EditPairsDataset("data/3dpe_ours/train", resolution=512)
    train, val = split(ds, val_fraction=0.05)
    item = train[0]   # input, target, reference: 3×R×R in [-1,1]; camera (25,); instruction; edit_type; ...
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.layout import DEFAULT_VOCABULARY, load_vocabulary, read_dataset_labels, read_jsonl
from utils.errors import ConfigError



@dataclass(frozen=True)
class Pair:
    input: str  # relative to root, '/'-separated
    target: str
    edit_type: str
    instruction: str | None = None


def _image_files(root: Path) -> list[str]:
    from utils.image_io import IMAGE_EXTENSIONS

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


def _read_manifest(root: Path) -> list[dict]:
    merged = root / "manifest.jsonl"
    if merged.is_file():
        return read_jsonl(merged)
    recs: dict[tuple, dict] = {}
    for p in sorted(root.glob("manifest.*.jsonl")):  # a run whose merge step has not happened yet
        for r in read_jsonl(p):
            recs[(r.get("input"), r.get("edit_type"), r.get("variant", 0))] = r
    return list(recs.values())


def _load_vocabulary(vocabulary: str | os.PathLike | None) -> dict[str, list[str]]:
    if vocabulary is None:
        return {}
    p = Path(vocabulary)
    if not p.is_file():
        return {}
    return {name: et.instructions for name, et in load_vocabulary(p).items()}


class EditPairsDataset(Dataset):
    """Edit pairs of a 3DPE dataset folder.

    Args:
        root: the folder with dataset.json (e.g. `3dpe_dataset/train`).
        manifest: True → read `manifest.jsonl` (or the per-rank `manifest.<r>.jsonl`), any file names;
            False → original naming rules only; None → the manifest when one exists.
        resolution: images are resized (bicubic) to resolution² when they differ.
        vocabulary: edit vocabulary YAML for instructions when the manifest gives none (None: style names only).
        edit_types: keep only these edit types (None: all).
        seed: base seed of the reference/instruction draws; `set_epoch(e)` changes the draw per epoch.

    Item (dict): `input`, `target`, `reference` float32 3×R×R in [-1,1]; `camera` float32 (25,) — the
    label of the input; `instruction` str; `edit_type` str; `input_path`, `target_path`, `reference_path`
    (relative to root); `index` int. The reference is a random edit of the same type of a DIFFERENT
    portrait (the target itself only when no other portrait has that edit), deterministic given
    (seed, epoch, index). The instruction is the manifest's, else a vocabulary phrasing for the style
    (drawn the same way), else the style name with '-' as spaces.
    """

    def __init__(self, root: str | os.PathLike, manifest: bool | None = None, resolution: int = 512,
                 vocabulary: str | os.PathLike | None = DEFAULT_VOCABULARY, edit_types: Sequence[str] | None = None,
                 seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"dataset folder '{self.root}' does not exist")
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.epoch = 0
        self.labels = read_dataset_labels(self.root / "dataset.json")
        has_manifest = (self.root / "manifest.jsonl").is_file() or any(self.root.glob("manifest.*.jsonl"))
        if manifest is True and not has_manifest:
            raise ConfigError(f"manifest=True but '{self.root}' has no manifest.jsonl")
        self.uses_manifest = has_manifest if manifest is None else bool(manifest)
        pairs = self._pairs_from_manifest() if self.uses_manifest else self._pairs_from_names()
        if edit_types is not None:
            pairs = [p for p in pairs if p.edit_type in set(edit_types)]
        self.vocabulary = _load_vocabulary(vocabulary)
        self._set_pairs(pairs)

    # ------------------------------------------------------------------------------ discovery
    def _pairs_from_names(self) -> list[Pair]:
        files = _image_files(self.root)
        present = set(files)
        inputs = [f for f in files if "_" not in f]
        styles_of: dict[str, list[str]] = {}
        for d in sorted(p.name for p in self.root.iterdir() if p.is_dir() and "_" in p.name and not p.name.startswith(".")):
            base, style = d.split("_", 1)
            styles_of.setdefault(base, []).append(style)
        pairs = []
        for rel in inputs:
            if "/" not in rel:
                continue  # a top-level image has no style folder
            base, rest = rel.split("/", 1)
            for style in styles_of.get(base, []):
                target = f"{base}_{style}/{rest}"
                if target in present:
                    pairs.append(Pair(rel, target, style))
        return pairs

    def _pairs_from_manifest(self) -> list[Pair]:
        pairs = []
        for r in _read_manifest(self.root):
            if not r.get("kept") or not r.get("output"):
                continue
            if (self.root / r["output"]).is_file() and (self.root / r["input"]).is_file():
                pairs.append(Pair(r["input"], r["output"], r["edit_type"], r.get("instruction")))
        return sorted(set(pairs), key=lambda p: (p.input, p.edit_type, p.target))

    def _set_pairs(self, pairs: list[Pair]) -> None:
        missing = [p.input for p in pairs if self._label_key(p.input) is None]
        if missing:
            raise ConfigError(f"{len(missing)} inputs have no label in {self.root / 'dataset.json'} "
                              f"(first: '{missing[0]}')")
        self.pairs = pairs
        self.by_type: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            self.by_type.setdefault(p.edit_type, []).append(i)

    def _label_key(self, rel: str) -> str | None:
        if rel in self.labels:
            return rel
        stem = rel.rsplit(".", 1)[0]
        return stem if stem in self.labels else None

    # ------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Change the reference/instruction draws (call each epoch, like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    @property
    def edit_types(self) -> list[str]:
        return sorted(self.by_type)

    @property
    def portraits(self) -> list[str]:
        return sorted({p.input for p in self.pairs})

    def reference_index(self, index: int, rng: np.random.Generator | None = None) -> int:
        """Index of the reference pair for item `index`: same edit type, another portrait when one exists."""
        pair = self.pairs[index]
        rng = rng or np.random.default_rng([self.seed, self.epoch, index, 0])
        pool = self.by_type[pair.edit_type]
        for _ in range(16):  # usually one pair per (input, type): rejection is cheap on large pools
            j = pool[int(rng.integers(len(pool)))]
            if self.pairs[j].input != pair.input:
                return j
        others = [j for j in pool if self.pairs[j].input != pair.input]
        return others[int(rng.integers(len(others)))] if others else index

    def instruction(self, index: int, rng: np.random.Generator | None = None) -> str:
        pair = self.pairs[index]
        if pair.instruction:
            return pair.instruction
        phrasings = self.vocabulary.get(pair.edit_type)
        if phrasings:
            rng = rng or np.random.default_rng([self.seed, self.epoch, index, 1])
            return phrasings[int(rng.integers(len(phrasings)))]
        return pair.edit_type.replace("-", " ")

    def load(self, rel: str) -> torch.Tensor:
        """Image at `rel` → float32 3×R×R in [-1,1] (bicubic-resized when its size differs)."""
        from utils.image_io import load_image_tensor

        return load_image_tensor(self.root / rel, self.resolution)[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.pairs):
            raise IndexError(index)
        pair = self.pairs[index]
        ref = self.pairs[self.reference_index(index)]
        label = self.labels[self._label_key(pair.input)]
        return {
            "input": self.load(pair.input),
            "target": self.load(pair.target),
            "reference": self.load(ref.target),
            "instruction": self.instruction(index),
            "camera": torch.tensor(label, dtype=torch.float32),
            "edit_type": pair.edit_type,
            "input_path": pair.input,
            "target_path": pair.target,
            "reference_path": ref.target,
            "index": index,
        }

    def subset(self, portraits: Iterable[str]) -> "EditPairsDataset":
        """A view with the pairs of these inputs only (references are drawn within the view)."""
        keep = set(portraits)
        view = copy.copy(self)
        view._set_pairs([p for p in self.pairs if p.input in keep])
        return view


def split(dataset: EditPairsDataset, val_fraction: float = 0.05, seed: int = 0,
          min_val: int = 1) -> tuple[EditPairsDataset, EditPairsDataset]:
    """Held-out validation by portrait: no input appears in both parts; each part draws references from itself.

    The draw is deterministic in `seed`: max(min_val, round(val_fraction · portraits)) portraits go to val.
    """
    portraits = dataset.portraits
    if len(portraits) < 2:
        raise ConfigError(f"need at least 2 portraits to split, '{dataset.root}' has {len(portraits)}")
    n_val = min(len(portraits) - 1, max(int(min_val), int(round(val_fraction * len(portraits)))))
    order = np.random.default_rng(seed).permutation(len(portraits))
    val = {portraits[i] for i in order[:n_val]}
    return dataset.subset(p for p in portraits if p not in val), dataset.subset(val)
