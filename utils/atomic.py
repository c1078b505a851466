"""Atomic file writes: a temporary file in the target's folder, renamed into place only when complete.

Every file the project writes in one go goes through here (`atomic_write` and its shorthands), so an interrupted
run never leaves a truncated file under the final name, and a failed write leaves the previous file untouched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, prefix: str | None = None, suffix: str = ".tmp",
                 fsync: bool = False, encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path`, on error it is removed.

    The temporary name is `<prefix><random><suffix>` (default prefix `.<name>.`), so readers and resumable jobs can
    recognise leftovers. Parent folders are created; the file gets the usual permissions (0666 & ~umask).
    `fsync=True` flushes the data to disk before the rename (manifests that must survive a crash).
    `encoding` applies to text modes ("w").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix,
                               dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", *, fsync: bool = False) -> None:
    """`Path(path).write_text(text)`, atomically (`fsync` as in `atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding, fsync=fsync) as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """`Path(path).write_bytes(data)`, atomically (`fsync` as in `atomic_write`)."""
    with atomic_write(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """`torch.save(obj, path, **kwargs)` (e.g. `pickle_module=`), atomically."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh, **kwargs)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; fill it, and on success it replaces `path` (a previous
    folder of that name is removed afterwards); on error it is removed and `path` is left as it was.

    A folder cannot be swapped in one rename when the target exists, so the old one is first renamed aside: a
    crash exactly between the two renames leaves the new folder under its hidden temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
