"""The files of a data-generation run (`pipelines/datagen.py`): per-rank jsonl logs appended in one write,
leftover temporaries, the edit naming, and the merge of every rank's logs into `manifest.jsonl` and `dataset.json`.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

from datasets.layout import read_jsonl
from utils.atomic import atomic_write_bytes


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append JSON lines in one write; a kill can at worst leave one torn last line (dropped on reload)."""
    data = _jsonl(records)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def repair_jsonl(path: Path) -> list[dict]:
    """Drop torn lines from this rank's own jsonl (rewritten atomically) so appends stay well-formed."""
    recs = read_jsonl(path)
    if path.is_file():
        text = _jsonl(recs)
        if text != path.read_text(encoding="utf-8"):
            atomic_write_bytes(path, text.encode(), fsync=True)
    return recs


def _is_temp_file(p: Path) -> bool:
    return p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".tmp.png"))


def stale_temps_for(target: Path) -> list[Path]:
    """Leftover temporaries of `target` (save_png: .<stem>.*.tmp.png; atomic_write: .<name>.*.tmp)."""
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.glob(f".{target.stem}.*") if _is_temp_file(p)] + [
        p for p in target.parent.glob(f".{target.name}.*") if _is_temp_file(p)
    ]


def edit_path(rel: str, style: str) -> str:
    """'<dir>/<file>.png' + style → '<dir>_<style>/<file>.png' (the original 3DPE naming)."""
    d, f = rel.split("/", 1)
    return f"{d}_{style}/{f}"


def merge_outputs(output_dir: str | os.PathLike) -> dict:
    """Merge `manifest.*.jsonl` → `manifest.jsonl` and `labels.*.jsonl` → `dataset.json`; remove stray temporaries.

    Idempotent: it can run any number of times, also while nothing else writes, e.g. after a SLURM array.
    Returns {'inputs', 'variants', 'kept', 'filtered_units', 'temp_removed'}.
    """
    out = Path(output_dir)
    variants: dict[tuple, dict] = {}
    for p in sorted(out.glob("manifest.*.jsonl")):
        for r in read_jsonl(p):
            variants[(r["input"], r["edit_type"], r.get("variant", 0))] = r
    rows = [variants[k] for k in sorted(variants)]
    atomic_write_bytes(out / "manifest.jsonl", _jsonl(rows).encode(), fsync=True)
    labels: dict[str, list[float]] = {}
    for p in sorted(out.glob("labels.*.jsonl")):
        for r in read_jsonl(p):
            if (out / r["path"]).is_file():
                labels[r["path"]] = r["label"]
    ds = {"labels": [[k, labels[k]] for k in sorted(labels)]}
    atomic_write_bytes(out / "dataset.json", json.dumps(ds).encode(), fsync=True)
    removed = 0
    for p in out.rglob(".*"):
        if p.is_file() and _is_temp_file(p):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    units = {(r["input"], r["edit_type"]): r.get("unit_status") for r in rows}
    return {"inputs": len(labels), "variants": len(rows), "kept": sum(bool(r.get("kept")) for r in rows),
            "filtered_units": sum(s == "filtered" for s in units.values()), "temp_removed": removed}
