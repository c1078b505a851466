"""Files that exist but cannot be decoded (cut short or damaged) → one `CorruptCheckpointError` naming the file.

    with reading(path):                 # around the code that decodes the bytes of `path`
        obj = torch.load(path, ...)

A truncated or damaged file makes the readers fail in many ways (torch's zip reader: "PytorchStreamReader
failed reading zip archive", safetensors: "incomplete metadata", pickle: "pickle data was truncated",
`invalid load key`, `UnicodeDecodeError`, ...). Only the decoding is guarded, so these all mean a bad file;
the project's own errors (a refused pickle global, an unknown format) and a missing or unreadable path pass
through unchanged.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from models.checkpoint.files import CONFIG_FILE, PROJECT_FILES, TRAINING_STATE_FILE
from utils.errors import CorruptCheckpointError, ThreeDPEError

_NOT_CORRUPTION = (ThreeDPEError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                   MemoryError)


def run_checkpoint_dir(path: Path) -> Path | None:
    """The training checkpoint folder (`exps/<run>/checkpoints/step_*`) that `path` is or is in, else None."""
    for d in (path, path.parent):
        if d.is_dir() and (d / TRAINING_STATE_FILE).is_file():
            return d
    return None


def what_to_do(path: Path) -> str:
    """The fix for a corrupt `path`: resume from the previous checkpoint of a run, else fetch the file again."""
    run = run_checkpoint_dir(path)
    if run is not None:
        return (f"It belongs to the training checkpoint '{run}': move that folder out of '{run.parent}' and "
                "resume again; --resume then goes on from the previous checkpoint.")
    again = "download or copy it again"
    if path.name in PROJECT_FILES and (path.parent / CONFIG_FILE).is_file():
        again = f"download, copy or convert the whole folder '{path.parent}' again"
    return f"It was probably cut short by an interrupted download, copy or save: {again}."


def short_reason(error: BaseException) -> str:
    """The reader's own reason, first sentence only (torch appends a paragraph of advice), at most 160 chars."""
    msg = " ".join(str(error).split())
    first = msg.split(". ")[0].rstrip(".") if msg else type(error).__name__
    if isinstance(error, OSError):  # e.g. torch's zip reader on a short file: "[Errno 22] Invalid argument"
        first = f"reading it failed: {first}"
    elif type(error).__name__ not in first and not isinstance(error, (RuntimeError, EOFError)):
        first = f"{type(error).__name__}: {first}"
    return first if len(first) <= 160 else first[:157] + "..."


def corrupt_error(path: str | os.PathLike, error: BaseException | str) -> CorruptCheckpointError:
    """The one-line error for a `path` that could not be decoded (`error`: the reader's exception, or a reason)."""
    path = Path(path)
    reason = error if isinstance(error, str) else short_reason(error)
    return CorruptCheckpointError(str(path), reason, what_to_do(path))


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn any failure to decode `path` inside the block into `CorruptCheckpointError` (see the module doc)."""
    try:
        yield
    except _NOT_CORRUPTION:
        raise
    except Exception as e:  # noqa: BLE001 — decoding a bad file fails in many ways (see the module doc)
        raise corrupt_error(path, e) from e
