"""Weights named by a Hugging Face Hub id, resolved through `huggingface_hub`'s cache.

    resolve_weights("pretrained_models/3dpe.pt")          # a local path: returned as it is (existing or not)
    resolve_weights("org/name")                           # the cached snapshot folder (config.json + model.safetensors)
    resolve_weights("org/name@v1.0")                      # the same at a branch, tag or full commit hash
    resolve_weights("org/name/3dpe.pt")                   # one file inside the repository (original formats)
    resolve_weights("org/name/sub")                       # a project-format folder inside the repository
    resolve_weights("org/name", files=("a.bin", "b.pth")) # the first of these files the repository has

A spec is read as a Hub id only when no local file or folder of that name exists and `parse_hub_id` accepts
it (rules there and in docs/checkpoints.md). Downloads go to (and offline reads come from) the standard
cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`); with `HF_HUB_OFFLINE=1` nothing touches the
network. The returned path is an ordinary local file or folder, so the callers' loaders (safetensors,
`torch.load(weights_only=True)`, the restricted unpickler) apply to it unchanged. Failures raise
`HubWeightsError` with one line that names the id, says that no local file of that name exists, and how to fix it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from models.checkpoint.files import CONFIG_FILE, PROJECT_FILES
from utils.errors import HubWeightsError

#: First path components that always mean a local path (the project's folders for weights and runs).
LOCAL_ROOTS = ("pretrained_models", "exps")
#: A repository name ending like this is a local file name (`models/3dpe.pt`), never a Hub id.
FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".safetensors", ".ckpt", ".json", ".yaml", ".yml", ".npz", ".onnx")

_RESOLVED: dict[str, Path] = {}  # spec → what it resolved to in this process (model cards reuse it)


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub id: `repo_id` ('org/name'), optional `revision` and `filename` (a path inside the repo)."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        org, name = self.repo_id.split("/")
        return f"{org}/{name}{rev}" + (f"/{self.filename}" if self.filename else "")

    def download_command(self, filename: str | None = None) -> str:
        """The `hf download` command that puts this reference into the cache."""
        cmd = f"hf download {self.repo_id}"
        target = filename if filename is not None else self.filename
        if target and not Path(target).suffix:  # a folder inside the repo
            cmd += f" --include '{target}/*'"
        elif target:
            cmd += f" {target}"
        return cmd + (f" --revision {self.revision}" if self.revision else "")


def parse_hub_id(spec: str | os.PathLike) -> HubRef | None:
    """`ORG/NAME[@REVISION][/PATH/IN/REPO]` → HubRef; None when `spec` must be a local path.

    Local (None): an empty spec, an absolute path or one starting with '.', '~'; one with '\\' or ':';
    fewer than two '/'-separated parts or an empty part; a first part that exists locally or is one of
    LOCAL_ROOTS; a repository name ending in a file suffix (FILE_SUFFIXES); an ORG/NAME that breaks the
    Hub's naming rules. The existence of `spec` itself is the caller's first test (`resolve_weights`).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    s = os.fspath(spec)
    if not s or s != s.strip() or s.startswith(("/", ".", "~")) or "\\" in s or ":" in s:
        return None
    parts = s.rstrip("/").split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    org, (name, at, revision) = parts[0], parts[1].partition("@")
    if (at and not revision) or "@" in org or org in LOCAL_ROOTS or Path(org).exists():
        return None
    if name.lower().endswith(FILE_SUFFIXES):
        return None
    try:
        validate_repo_id(f"{org}/{name}")
    except HFValidationError:
        return None
    return HubRef(f"{org}/{name}", revision or None, "/".join(parts[2:]) or None)


def is_local_or_hub(spec: str | os.PathLike) -> bool:
    """True when `spec` exists locally or reads as a Hub id (for the tools' early 'not found' check)."""
    return Path(spec).exists() or parse_hub_id(spec) is not None


def resolve_weights(spec: str | os.PathLike, *, files: Sequence[str] | None = None) -> Path:
    """A local path for `spec`: itself when it exists or is not a Hub id, else the file/folder in the HF cache.

    `files`: for an id without a path inside the repo, the candidate file names (the first one the repo has
    is returned); None means the project format (a folder with config.json + model.safetensors).
    A local path is returned unchanged even when missing, so callers keep their own missing-file message.
    Raises HubWeightsError (one line) when the Hub id cannot be had (not cached offline, no such repository,
    revision or file, Hub unreachable).
    """
    path = Path(spec)
    if path.exists():
        return path
    ref = parse_hub_id(spec)
    if ref is None:
        return path
    if ref.filename and Path(ref.filename).suffix:
        out = _fetch(ref, spec, ref.filename)
    elif ref.filename or files is None:  # a project-format folder (the repo root or a folder inside it)
        prefix = f"{ref.filename}/" if ref.filename else ""
        first = _fetch(ref, spec, prefix + CONFIG_FILE, project=True)
        commit = hub_origin(first)
        pinned = HubRef(ref.repo_id, commit["commit"] if commit else ref.revision, ref.filename)
        for name in PROJECT_FILES[1:]:  # the same commit as the first file, even if the branch moves meanwhile
            _fetch(pinned, spec, prefix + name, project=True)
        out = first.parent
    else:
        out = _first_of(ref, spec, files)
    _RESOLVED[os.fspath(spec)] = out
    return out


def resolved(spec: str | os.PathLike) -> Path | None:
    """What `resolve_weights(spec)` returned earlier in this process for a Hub id (None if it was not one)."""
    return _RESOLVED.get(os.fspath(spec))


def hub_origin(path: str | os.PathLike) -> dict[str, str] | None:
    """{'repo_id', 'commit', 'file'} for a path inside the HF cache (`models--ORG--NAME/snapshots/<commit>/...`)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo = parts[i][len("models--"):].split("--")
            if len(repo) != 2:
                return None
            return {"repo_id": "/".join(repo), "commit": parts[i + 2], "file": "/".join(parts[i + 3:])}
    return None


# ------------------------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _fetch(ref: HubRef, spec: str | os.PathLike, filename: str, project: bool = False) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    head = f"no local file or folder '{os.fspath(spec)}'; as the Hugging Face Hub id '{ref}'"
    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision))
    except LocalEntryNotFoundError as e:
        raise HubWeightsError(os.fspath(spec), _not_cached(ref, spec)) from e
    except RepositoryNotFoundError as e:  # GatedRepoError included
        raise HubWeightsError(os.fspath(spec), f"{head}: the Hub has no repository '{ref.repo_id}' you can read "
                              "(check the spelling; private or gated repositories need `hf auth login`)") from e
    except RevisionNotFoundError as e:
        raise HubWeightsError(os.fspath(spec), f"{head}: repository '{ref.repo_id}' has no revision "
                              f"'{ref.revision}'") from e
    except EntryNotFoundError as e:
        hint = (f"; for a checkpoint in an original format name the file inside it, e.g. {ref.repo_id}/3dpe.pt"
                if project and not ref.filename else "")
        raise HubWeightsError(os.fspath(spec), f"{head}: repository '{ref.repo_id}' has no file '{filename}'"
                              f"{hint}") from e
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubWeightsError(os.fspath(spec), f"{head}: the Hub request failed ({first})") from e


def _first_of(ref: HubRef, spec: str | os.PathLike, files: Sequence[str]) -> Path:
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    not_cached = False
    for name in files:
        try:
            return _fetch(ref, spec, name)
        except HubWeightsError as e:
            if isinstance(e.__cause__, LocalEntryNotFoundError):
                not_cached = True
            elif not isinstance(e.__cause__, EntryNotFoundError):
                raise
    if not_cached:
        raise HubWeightsError(os.fspath(spec), _not_cached(ref, spec, files[0]))
    raise HubWeightsError(os.fspath(spec), f"no local file or folder '{os.fspath(spec)}'; the Hugging Face Hub "
                          f"repository '{ref.repo_id}' has none of {', '.join(files)}: name the file, "
                          f"e.g. {ref.repo_id}/<file>")


def _not_cached(ref: HubRef, spec: str | os.PathLike, filename: str | None = None) -> str:
    where = f"no local file or folder '{os.fspath(spec)}', and the Hugging Face Hub id '{ref}' is not in the cache"
    cmd = ref.download_command(filename)
    if _offline():
        return (f"{where} and HF_HUB_OFFLINE=1: run `{cmd}` on a machine with internet "
                "(then copy the cache, see HF_HUB_CACHE) or unset HF_HUB_OFFLINE")
    return f"{where} and the Hub could not be reached: check the connection, or run `{cmd}` where there is one"
