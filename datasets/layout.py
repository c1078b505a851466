"""Readers of the on-disk layouts the project shares between data generation and training.

    ROOT/dataset.json            EG3D camera labels: {"labels": [["<dir>/<file>.png", [25 floats]], ...]}
    ROOT/*.jsonl                 one JSON object per line (manifests, per-rank label logs)
    configs/edit_vocabulary.yaml the edit types: name → instructions and CLIP captions
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from utils.errors import ConfigError

_REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCABULARY = _REPO_ROOT / "configs" / "edit_vocabulary.yaml"


def read_dataset_labels(path: Path) -> dict[str, list[float]]:
    """EG3D `dataset.json` → {relative '/'-separated path: 25 floats}.

    Accepts {"labels": list of [path, label] pairs | {path: label}} or a bare dict/list of them.
    """
    if not path.is_file():
        raise ConfigError(f"'{path}' not found: a 3DPE/EG3D dataset folder has a dataset.json of camera labels "
                          "(point the tool at the folder that holds it, e.g. 3dpe_dataset/train)")
    data = json.loads(path.read_text())
    labels = data.get("labels", data) if isinstance(data, dict) else data
    if not labels:
        raise ConfigError(f"'{path}' has no labels; a 25-d camera label per image is needed")
    items = labels.items() if isinstance(labels, dict) else labels
    out: dict[str, list[float]] = {}
    for entry in items:
        rel, lab = entry[0], [float(v) for v in entry[1]]
        if len(lab) != 25:
            raise ConfigError(f"'{path}': label of '{rel}' has {len(lab)} values, expected 25")
        out[str(rel).replace("\\", "/")] = lab
    return out


def read_jsonl(path: Path) -> list[dict]:
    """Valid JSON-object lines of `path` (a torn last line from a killed writer is skipped); [] if absent."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class EditType:
    name: str
    instructions: list[str]
    source_caption: str
    target_caption: str


def load_vocabulary(path: str | os.PathLike) -> dict[str, EditType]:
    """Read configs/edit_vocabulary.yaml → {name: EditType}; names must not contain '_' (folder suffixes)."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (_REPO_ROOT / p).is_file():
        p = _REPO_ROOT / p  # configs name it relative to the repository
    if not p.is_file():
        raise ConfigError(f"edit vocabulary '{p}' not found (set edit.vocabulary to configs/edit_vocabulary.yaml)")
    data = yaml.safe_load(p.read_text()) or {}
    default_src = data.get("default_source_caption", "a photo of a person")
    out: dict[str, EditType] = {}
    for name, entry in (data.get("edits") or {}).items():
        if "_" in name or "/" in name or not name:
            raise ConfigError(f"{p}: edit type '{name}' must not contain '_' or '/' (use '-')")
        entry = entry or {}
        instructions = list(entry.get("instructions") or [])
        if not instructions:
            raise ConfigError(f"{p}: edit type '{name}' has no instructions")
        out[name] = EditType(
            name=name,
            instructions=[str(s) for s in instructions],
            source_caption=str(entry.get("source_caption", default_src)),
            target_caption=str(entry.get("target_caption", name.replace("-", " "))),
        )
    if not out:
        raise ConfigError(f"{p}: no edit types under 'edits:'")
    return out
