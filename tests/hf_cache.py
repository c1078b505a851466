"""A Hugging Face Hub cache laid out on disk exactly as `huggingface_hub` lays it out, for offline tests.

    <cache>/models--ORG--NAME/blobs/<sha256>                    file contents
    <cache>/models--ORG--NAME/snapshots/<commit>/<path>         relative symlinks into blobs/
    <cache>/models--ORG--NAME/refs/<branch or tag>              the commit hash (no newline)
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import pytest


def add_to_cache(cache: Path, repo_id: str, files: Mapping[str, Path | bytes], refs: tuple[str, ...] = ("main",),
                 commit: str | None = None) -> str:
    """Put `files` (path in repo → local file, folder or bytes) at one commit; point `refs` at it; return the commit."""
    items: dict[str, bytes] = {}
    for rel, src in files.items():
        if isinstance(src, Path) and src.is_dir():
            items.update({f"{rel}/{p.name}".lstrip("/"): p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()})
        else:
            items[rel] = src.read_bytes() if isinstance(src, Path) else src
    commit = commit or hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in items.items()))
                                    .encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for rel, data in items.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


def use_offline_cache(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """Point huggingface_hub (env and the constants it read at import) at an empty cache under `root`, offline."""
    import huggingface_hub.constants as hf_constants

    from models.checkpoint import hub

    cache = root / "hf_home" / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    mp.setenv("HF_HOME", str(root / "hf_home"))
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    mp.setattr(hub, "_RESOLVED", {})
    return cache
