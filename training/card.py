"""The facts a training (or customisation) run puts in its checkpoints' model cards (models/checkpoint/model_card.py).

    card = training_card(cfg, train_set, nets["source"])          # once per run, on rank 0
    write_model_card(snapshot_dir, steps=step, **card)            # at every snapshot and at the end
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import Dataset

from models.checkpoint.model_card import choose_licence, licence_of_checkpoint
from utils.config import to_dict

#: `build_networks` source keys that name weights the run starts from.
BASE_KEYS = ("init_checkpoint", "student_checkpoint", "mae_pretrain", "clip_pretrained")
#: Bases whose licence carries over to the trained editing module (MAE / CLIP towers are general-purpose).
LICENCE_KEYS = ("init_checkpoint", "student_checkpoint")


def describe_data(dataset: Dataset) -> dict[str, Any]:
    """What is known about the training pairs: source, size, and — for `datagen` output — how it was made.

    Reads `len(dataset)` and, when present, the dataset's `root`, `portraits`, `edit_types` and `card_data`
    (a dict the creator attached, e.g. customisation's pairs folder), and `ROOT/datagen_config.yaml`.
    """
    import yaml

    out: dict[str, Any] = dict(getattr(dataset, "card_data", None) or {})
    root = getattr(dataset, "root", None)
    if root is not None:
        out.setdefault("source", str(root))
    out["pairs"] = len(dataset)
    for name in ("portraits", "edit_types"):
        value = getattr(dataset, name, None)
        if value is not None:
            out[name] = len(value) if name == "portraits" else list(value)
    gen_file = Path(root) / "datagen_config.yaml" if root is not None else None
    if gen_file is not None and gen_file.is_file():
        gen = yaml.safe_load(gen_file.read_text()) or {}
        src, edit, filt = gen.get("source") or {}, gen.get("edit") or {}, gen.get("filter") or {}
        made = {"kind": src.get("kind"), "network": src.get("network") if src.get("kind") == "eg3d" else None,
                "photos": src.get("photos_dir") if src.get("kind") == "photos" else None,
                "editor": edit.get("model"), "config": str(gen_file)}
        out["generated_by"] = {k: v for k, v in made.items() if v}
        if filt.get("enabled"):
            out["filter"] = {k: filt[k] for k in ("clip_model", "min_directional", "min_image_similarity")
                             if filt.get(k) is not None}
    return out


def training_card(cfg: Any, train_set: Dataset, source: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `write_model_card` for a run (all but `steps`): licence from the bases and data."""
    bases = {k: source.get(k) for k in BASE_KEYS if source.get(k)}
    derived: dict[str, str | None] = {}
    for key in LICENCE_KEYS:
        if key in bases:
            kind, what = licence_of_checkpoint(bases[key])
            derived[f"its {key.replace('_', ' ')} '{bases[key]}' is {what}"] = kind
    data = describe_data(train_set)
    network = (data.get("generated_by") or {}).get("network")
    if network and "ffhq" in Path(str(network)).name.lower():
        derived[f"its training portraits were rendered by EG3D's FFHQ generator '{network}'"] = "ffhq"
    licence, reasons = choose_licence("3dpe", derived)
    return {"model_type": "3dpe", "licence": licence, "licence_reasons": reasons, "base_checkpoints": bases,
            "training_config": to_dict(cfg), "data": data, "title": cfg.name}
