"""Model cards: the `README.md` (Hub-format YAML metadata + text) of every checkpoint folder the project writes.

    write_model_card(folder, model_type="3dpe", licence="ffhq", licence_reasons=["..."],
                     base_checkpoints={"init_checkpoint": "pretrained_models/encoder_render_LT_90000.pt"},
                     training_config=to_dict(cfg), data={"source": "data/3dpe_dataset/train", "pairs": 120000},
                     steps=2000, title="run1")
    update_evaluation(folder, {"mean": {"clip_directional": 0.21}, "count": 12, "data": "test_imgs"})
    card = read_model_card(folder)    # {'metadata': {...}, 'title': str, 'intro': str, 'sections': {name: text}}

The front matter is written with `huggingface_hub.ModelCardData` (the Hub's own schema: `license`,
`license_name`, `license_link`, `library_name`, `tags`, `base_model`, `model-index`), plus a `threedpe`
key with the facts in machine-readable form (model type, steps, base checkpoints with their sha256, data).
A card states only what is known: a field without a value is left out, never filled with a placeholder.

Licences (`LICENCES`): 'ffhq' → `cc-by-nc-sa-4.0` (FFHQ's terms carry over to everything trained on FFHQ or on
renderings of EG3D's FFHQ generator: 3DPE, Live3D, our training runs from them); 'eg3d' → `other` with
`license_name: nvidia-source-code-license` (NVIDIA's EG3D generator weights themselves); None → no licence key
(the weights derive from no released checkpoint and the data's licence is unknown). The text says why.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from models.checkpoint.files import CONFIG_FILE, WEIGHTS_FILE

CARD_FILE = "README.md"
LIBRARY_NAME = "threedpe"
EG3D_LICENSE_LINK = "https://github.com/NVlabs/eg3d/blob/main/LICENSE.txt"
LICENCES: dict[str, dict[str, str]] = {
    "ffhq": {"license": "cc-by-nc-sa-4.0"},
    "eg3d": {"license": "other", "license_name": "nvidia-source-code-license", "license_link": EG3D_LICENSE_LINK},
}
_FORMAT_LICENCE = {"3dpe": "ffhq", "live3d-lt": "ffhq", "live3d-normal": "ffhq", "eg3d-pkl": "eg3d", "eg3d-pth": "eg3d"}
_FORMAT_NAMES = {  # the formats of the released weights, and where their training data came from
    "3dpe": "a 3DPE checkpoint (3dpe.pt; 3DPE trains on renderings of EG3D's FFHQ generator)",
    "live3d-lt": "a Live3D LT checkpoint (Live3D trains on renderings of EG3D's FFHQ generator)",
    "live3d-normal": "a Live3D Normal checkpoint (Live3D trains on renderings of EG3D's FFHQ generator)",
    "eg3d-pkl": "an EG3D network pickle (NVIDIA)", "eg3d-pth": "a converted EG3D .pth (NVIDIA)"}
_DESCRIPTIONS = {
    "3dpe": "A 3DPE editing module (editing encoder + triplane renderer): one portrait and one prompt in, an "
            "edited EG3D triplane out, rendered from any camera.",
    "live3d": "A Live3D reconstruction module (encoder + triplane renderer): one portrait in, its EG3D triplane out.",
    "eg3d": "An EG3D triplane generator (and discriminator when present), converted to the threedpe format.",
}
_METRIC_NAMES = {"clip_directional": "CLIP directional similarity", "clip_image_text": "CLIP image-text similarity",
                 "clip_multiview": "CLIP multi-view consistency", "identity": "identity similarity (ArcFace)",
                 "identity_multiview": "identity multi-view consistency", "lpips": "LPIPS to the input",
                 "seconds": "seconds per edit"}
_ORDER = ("Use", "Licence", "Base checkpoints", "Training", "Data", "Evaluation", "Files")
_HASHES: dict[tuple[str, int, int], str] = {}


# ------------------------------------------------------------------------------------------------------------
# facts
# ------------------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (memoised per path, size and mtime: training hashes its bases at every snapshot)."""
    p = Path(path)
    st = p.stat()
    key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def licence_of_format(fmt: str | None) -> str | None:
    """'ffhq' / 'eg3d' for the released formats (see the module doc), None for anything else."""
    return _FORMAT_LICENCE.get(fmt or "")


def licence_of_folder(folder: str | os.PathLike) -> str | None:
    """The licence kind of a project-format folder: its card's licence, else its config.json's source format."""
    folder = Path(folder)
    if (folder / CARD_FILE).is_file():
        meta = read_model_card(folder)["metadata"]
        for kind, keys in LICENCES.items():
            if all(meta.get(k) == v for k, v in keys.items()):
                return kind
        return None
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cfg.get("model_type") == "eg3d":
        return "eg3d"
    return licence_of_format((cfg.get("source") or {}).get("format"))


def licence_of_checkpoint(spec: str | os.PathLike) -> tuple[str | None, str]:
    """(licence kind, what it is) of a base checkpoint: a file's detected format, a folder's card or config."""
    from models.checkpoint import hub

    path = hub.resolved(spec) or hub.resolve_weights(spec)
    if path.is_dir():
        return licence_of_folder(path), "a threedpe checkpoint"
    from models.checkpoint import detect_format

    fmt = detect_format(path)
    return licence_of_format(fmt), _FORMAT_NAMES.get(fmt, fmt)


def choose_licence(model_type: str, sources: Mapping[str, str | None]) -> tuple[str | None, list[str]]:
    """The licence kind of new weights from those of their sources (description → kind), and the reasons.

    EG3D generator weights keep NVIDIA's licence; anything else derived from an FFHQ or EG3D-FFHQ source is
    FFHQ-derived; with no such source no licence is claimed.
    """
    derived = [d for d, kind in sources.items() if kind in LICENCES]
    if model_type == "eg3d":
        return "eg3d", derived
    return ("ffhq", derived) if derived else (None, [])


def describe_base(role: str, spec: str | os.PathLike) -> dict[str, Any]:
    """{'role', 'source', 'file', 'sha256'[, 'repo_id', 'revision']} of a base checkpoint (Hub ids resolved).

    For a project-format folder the hash is that of its `model.safetensors` ('file' says which file was hashed).
    A source that does not exist (any more) gets no hash: nothing is claimed about it.
    """
    from models.checkpoint import hub

    out: dict[str, Any] = {"role": role, "source": os.fspath(spec)}
    path = hub.resolved(spec) or hub.resolve_weights(spec)
    target = path / WEIGHTS_FILE if path.is_dir() else path
    origin = hub.hub_origin(target)
    if origin is not None:
        out.update(repo_id=origin["repo_id"], revision=origin["commit"])
    if target.is_file():
        out.update(file=origin["file"] if origin else target.name, sha256=sha256_file(target))
    return out


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------
def write_model_card(
    folder: str | os.PathLike,
    *,
    model_type: str,
    licence: str | None,
    licence_reasons: Sequence[str] = (),
    base_checkpoints: Mapping[str, str | os.PathLike] | None = None,
    training_config: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    steps: int | None = None,
    evaluation: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write `folder/README.md` atomically; returns its path.

    model_type: '3dpe' | 'live3d' | 'eg3d'; licence: a key of LICENCES or None (no licence claimed), with
    `licence_reasons` (short clauses: why); base_checkpoints: role → local path or Hub id (empty values are
    skipped; each is hashed, see `describe_base`); training_config: the run's config as a dict; data: facts
    about the training data ('source', 'pairs', 'portraits', 'filter', ...); steps: optimisation steps trained;
    evaluation: `tools.evaluate`'s result ('mean', 'count', 'data'). Every None / empty argument is left out.
    """
    folder = Path(folder)
    bases = [describe_base(r, s) for r, s in (base_checkpoints or {}).items() if s]
    facts: dict[str, Any] = {"model_type": model_type}
    if steps is not None:
        facts["steps"] = int(steps)
    if bases:
        facts["base_checkpoints"] = bases
    if data:
        facts["data"] = _clean(dict(data))
    sections: dict[str, str] = {"Use": _use_section(model_type)}
    sections["Licence"] = _licence_section(licence, licence_reasons)
    if bases:
        sections["Base checkpoints"] = _bases_section(bases)
    training = _training_section(steps, training_config)
    if training:
        sections["Training"] = training
    if facts.get("data"):
        sections["Data"] = _data_section(facts["data"])
    sections["Files"] = ("- `config.json`: the architecture and provenance (threedpe format)\n"
                         "- `model.safetensors`: the weights (tensors only: loading runs no code)\n"
                         "- `README.md`: this card")
    card = {"metadata": _metadata(model_type, licence, bases, facts), "title": title or folder.name,
            "intro": _DESCRIPTIONS.get(model_type, ""), "sections": sections}
    if evaluation:
        _set_evaluation(card, evaluation)
    return _write(folder, card)


def update_evaluation(folder: str | os.PathLike, evaluation: Mapping[str, Any]) -> Path:
    """Put `tools.evaluate`'s figures into a project folder's card (written from config.json if it has none)."""
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        model_type = cfg.get("model_type", "3dpe")
        write_model_card(folder, model_type=model_type, licence=licence_of_folder(folder),
                         licence_reasons=_folder_reasons(cfg))
    card = read_model_card(folder)
    _set_evaluation(card, evaluation)
    return _write(folder, card)


def write_conversion_card(folder: str | os.PathLike, ckpt: Any, src: str | os.PathLike) -> Path:
    """The card of a folder `tools.convert_checkpoint` wrote from `src` (a `LoadedCheckpoint` `ckpt`).

    Licence: the source format's ('ffhq' for 3DPE / Live3D, 'eg3d' for EG3D), or a project folder's own;
    base: `src` with its sha256; steps, the original training options and (EG3D) training-set facts as
    recorded in the source file.
    """
    if ckpt.format == "threedpe":  # meta['source_path']: the (resolved) project folder
        kind, reasons = licence_of_folder(ckpt.meta["source_path"]), [f"it is a copy of the threedpe checkpoint '{src}'"]
    else:
        kind, reasons = licence_of_format(ckpt.format), [f"it was converted from {_FORMAT_NAMES[ckpt.format]}"]
    if ckpt.model_type == "eg3d":
        kind = "eg3d"
    opts = ckpt.meta.get("opts") if isinstance(ckpt.meta.get("opts"), Mapping) else None
    tsk = ckpt.meta.get("training_set_kwargs") or {}
    data = {"source": tsk.get("path") or (opts or {}).get("train_data_path"), "images": tsk.get("max_size"),
            "resolution": tsk.get("resolution"), "xflip": tsk.get("xflip")}
    step = ckpt.meta.get("step")
    return write_model_card(folder, model_type=ckpt.model_type, licence=kind, licence_reasons=reasons,
                            base_checkpoints={"converted from": src}, training_config=opts, data=data,
                            steps=int(step) if isinstance(step, int) else None, title=Path(folder).name)


def _folder_reasons(cfg: Mapping[str, Any]) -> list[str]:
    fmt = (cfg.get("source") or {}).get("format")
    return [f"it was converted from {_FORMAT_NAMES[fmt]}"] if fmt in _FORMAT_NAMES else []


def _clean(obj: Any) -> Any:
    """JSON-safe, with None values and empty containers dropped (a card claims nothing it does not know)."""
    obj = json.loads(json.dumps(obj, default=str))
    if isinstance(obj, dict):
        out = {k: _clean(v) for k, v in obj.items() if v is not None}
        return {k: v for k, v in out.items() if v not in ({}, [], "")}
    if isinstance(obj, list):
        return [_clean(v) for v in obj if v is not None]
    return obj


def _metadata(model_type: str, licence: str | None, bases: list[dict], facts: dict) -> dict[str, Any]:
    from huggingface_hub import ModelCardData

    repos = list(dict.fromkeys(b["repo_id"] for b in bases if "repo_id" in b))
    tags = ["threedpe", "eg3d", "triplane", "3d"] + (["portrait-editing"] if model_type == "3dpe" else [])
    data = ModelCardData(library_name=LIBRARY_NAME, tags=tags, base_model=repos or None,
                         pipeline_tag="image-to-3d" if model_type in ("3dpe", "live3d") else None,
                         **LICENCES.get(licence or "", {}))
    meta = data.to_dict()
    meta["threedpe"] = _clean(facts)
    return meta


def _use_section(model_type: str) -> str:
    if model_type == "eg3d":
        return ("```bash\npython -m tools.eg3d_samples --network ORG/NAME --seeds 0-3 --outdir out\n```\n"
                "`ORG/NAME` is this folder's Hugging Face Hub id once uploaded (`hf upload ORG/NAME DIR`), "
                "or its local path.")
    return ("```python\nfrom pipelines.editor import PortraitEditor\n"
            "editor = PortraitEditor.from_pretrained(\"ORG/NAME\")\n```\n"
            "or `python test_scripts.py --checkpoint ORG/NAME`, in a threedpe checkout (a re-implementation of "
            "3DPE, ECCV 2024). `ORG/NAME` is this folder's Hugging Face Hub id once uploaded "
            "(`hf upload ORG/NAME DIR`), or its local path.")


def _licence_section(licence: str | None, reasons: Sequence[str]) -> str:
    why = "; ".join(reasons)
    if licence == "ffhq":
        text = ("CC BY-NC-SA 4.0 (`cc-by-nc-sa-4.0`): non-commercial use only, share-alike. "
                "These weights are derived from FFHQ"
                + (f": {why}." if why else ".")
                + " FFHQ is released under CC BY-NC-SA 4.0, and models trained on it (or on renderings of EG3D's "
                "FFHQ generator, itself under the NVIDIA Source Code License, non-commercial) follow those terms.")
    elif licence == "eg3d":
        text = ("The NVIDIA Source Code License (`license: other`, `license_name: nvidia-source-code-license`, "
                f"{EG3D_LICENSE_LINK}): non-commercial research use only. These are NVIDIA's EG3D generator weights"
                + (f" ({why})" if why else "")
                + "; the Hub has no identifier for this licence, hence `other`. EG3D's FFHQ models were trained on "
                "FFHQ (CC BY-NC-SA 4.0).")
    else:
        text = ("No licence is declared: these weights derive from no released checkpoint, and the licence of "
                "their training data is not known to the tool that wrote this card. Choose one that fits the data "
                "before publishing.")
    return text + " The threedpe code is Apache-2.0; that licence does not cover weights."


def _bases_section(bases: list[dict]) -> str:
    lines = ["| role | checkpoint | hashed file | sha256 |", "|---|---|---|---|"]
    for b in bases:
        where = f"`{b['source']}`"
        if "repo_id" in b:
            where += f" (Hub `{b['repo_id']}` at `{b['revision']}`)"
        lines.append(f"| {b['role']} | {where} | {b.get('file', '')} | {b.get('sha256', '')} |")
    return "\n".join(lines)


def _training_section(steps: int | None, config: Mapping[str, Any] | None) -> str:
    import yaml

    parts = []
    if steps is not None:
        parts.append(f"Steps trained: {int(steps)}.")
    if config:
        dumped = yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False).rstrip()
        parts.append(f"Configuration, as recorded by the training run:\n\n```yaml\n{dumped}\n```")
    return "\n\n".join(parts)


def _data_section(data: Mapping[str, Any]) -> str:
    lines = []
    labels = {"source": "source", "pairs": "training pairs", "portraits": "portraits", "edit_types": "edit types",
              "generated_by": "generated by", "filter": "CLIP filter", "edits": "edits"}
    for k, v in data.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} = {vv}" for kk, vv in v.items())
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        lines.append(f"- {labels.get(k, k)}: {v}")
    return "\n".join(lines)


def _set_evaluation(card: dict, evaluation: Mapping[str, Any]) -> None:
    from huggingface_hub import EvalResult, ModelCardData

    # only measured numbers: "unavailable" / "not applicable" metrics are left out, never written as values
    means = {k: v for k, v in (evaluation.get("mean") or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    runtime, device = evaluation.get("runtime_seconds_per_edit"), evaluation.get("device")
    runtime = runtime if isinstance(runtime, (int, float)) and not isinstance(runtime, bool) else None
    card["metadata"].pop("model-index", None)
    card["sections"].pop("Evaluation", None)
    if not means and runtime is None:
        return
    count, source = evaluation.get("count"), evaluation.get("data")
    edits = f"{count} edit{'s' if count != 1 else ''}" if count else ""
    dataset = (f"{source} ({edits})" if edits else f"{source}") if source else edits or "edits"
    lines = ["| metric | mean |", "|---|---|"] + [f"| {_METRIC_NAMES.get(k, k)} | {v} |" for k, v in means.items()]
    if runtime is not None:  # hardware-dependent: in the text with its device, not in model-index
        lines.append(f"| seconds per edit (median of encode prompt + edit + render, loading and writing excluded"
                     f"{f', device {device}' if device else ''}) | {runtime} |")
    if means:
        results = [EvalResult(task_type="image-to-3d", dataset_type=Path(str(source or "edits")).name,
                              dataset_name=dataset, metric_type=k, metric_value=float(v),
                              metric_name=_METRIC_NAMES.get(k, k)) for k, v in means.items()]
        card["metadata"]["model-index"] = ModelCardData(model_name=card["title"], eval_results=results).to_dict()[
            "model-index"]
    tail = f"Measured by `tools/evaluate.py` on {dataset}."
    card["sections"]["Evaluation"] = "\n".join(lines) + "\n\n" + tail


def _write(folder: Path, card: dict) -> Path:
    import yaml
    from huggingface_hub import ModelCard

    from utils.atomic import atomic_write

    meta = yaml.safe_dump(card["metadata"], sort_keys=False, allow_unicode=True).rstrip()
    names = [n for n in _ORDER if n in card["sections"]] + [n for n in card["sections"] if n not in _ORDER]
    body = f"# {card['title']}\n\n" + (f"{card['intro']}\n\n" if card.get("intro") else "")
    body += "".join(f"## {n}\n\n{card['sections'][n].strip()}\n\n" for n in names)
    text = f"---\n{meta}\n---\n\n{body.rstrip()}\n"
    ModelCard(text)  # the Hub's own parser must accept it (raises on malformed metadata)
    with atomic_write(folder / CARD_FILE, "w") as f:
        f.write(text)
    return folder / CARD_FILE


# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------
def read_model_card(folder: str | os.PathLike) -> dict[str, Any]:
    """{'metadata': front matter dict, 'title': str, 'intro': str, 'sections': {'Licence': text, ...}}."""
    import yaml

    path = Path(folder)
    path = path / CARD_FILE if path.is_dir() else path
    text = path.read_text()
    meta: dict[str, Any] = {}
    if text.startswith("---\n"):
        end = text.index("\n---", 4)
        meta = yaml.safe_load(text[4:end]) or {}
        text = text[end + 4:]
    title, intro, sections, current = "", [], {}, None
    for line in text.strip("\n").splitlines():
        if line.startswith("# ") and not title and current is None:
            title = line[2:].strip()
        elif line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is None:
            intro.append(line)
        else:
            sections[current].append(line)
    return {"metadata": meta, "title": title, "intro": "\n".join(intro).strip(),
            "sections": {k: "\n".join(v).strip() for k, v in sections.items()}}
