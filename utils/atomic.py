"""Atomic file writes: a temporary file in the target's folder, renamed into place only when complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, prefix: str | None = None, suffix: str = ".tmp",
                 fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path`, on error it is removed.

    The temporary name is `<prefix><random><suffix>` (default prefix `.<name>.`), so readers and resumable jobs can
    recognise leftovers. Parent folders are created; the file gets the usual permissions (0666 & ~umask).
    `fsync=True` flushes the data to disk before the rename (manifests that must survive a crash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix,
                               dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
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
