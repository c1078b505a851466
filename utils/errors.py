"""Named exceptions for every failure a user can fix. Each message says what to do."""
from __future__ import annotations


class ThreeDPEError(Exception):
    """Base class of the project's user-facing errors."""


class MissingWeightsError(ThreeDPEError, FileNotFoundError):
    """A weight file is not where it should be.

    The message names the file, where it goes, and where users get it.
    """

    def __init__(self, path: str, what: str, where_to_get: str):
        self.path = str(path)
        super().__init__(
            f"Missing {what}: '{path}' does not exist.\n"
            f"  Put the file there (or pass its path explicitly).\n"
            f"  Where to get it: {where_to_get}"
        )


class HubWeightsError(MissingWeightsError):
    """Weights named by a Hugging Face Hub id cannot be had (not cached offline, no such repository/revision/file).

    One line: the id, that no local file of that name exists, and the fix (`hf download ...`).
    """

    def __init__(self, spec: str, message: str):
        self.path = str(spec)
        ThreeDPEError.__init__(self, message)


class UnsafePickleError(ThreeDPEError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


class UnknownCheckpointFormatError(ThreeDPEError):
    """A file's content matches none of the supported checkpoint formats."""


class CorruptCheckpointError(ThreeDPEError):
    """A weight file exists but cannot be read: cut short (an interrupted download, copy or save) or damaged.

    The message names the file, says it is incomplete or corrupt (with the reader's own reason) and what to do.
    """

    def __init__(self, path: str, reason: str, fix: str):
        self.path = str(path)
        super().__init__(f"'{path}' is incomplete or corrupt ({reason}). {fix}")


class BadImageError(ThreeDPEError):
    """An image file cannot be read or converted."""


class ConfigError(ThreeDPEError, ValueError):
    """A config file or a key=value override is wrong."""


class NoFaceError(ThreeDPEError):
    """No face with enough confidence was found in an image."""


def report_user_error(error: BaseException) -> int:
    """Print `error` for the user as one line on stderr and return the exit code of a usage error (2).

    The message's own lines are joined; under torchrun (WORLD_SIZE > 1) the line starts with the rank,
    since every rank that hits the error prints it. Command-line entry points catch ThreeDPEError in
    `main` and return this, so a user error never ends in a traceback.
    """
    import os
    import sys

    from utils.distributed import print_line  # one write per line: ranks' lines never run into each other

    msg = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print_line(f"{prefix}error: {msg}", file=sys.stderr)
    return 2
