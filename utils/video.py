"""Video writing and reading with imageio/ffmpeg; a killed run never leaves a corrupt file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from utils.errors import ThreeDPEError


class BadVideoError(ThreeDPEError, ValueError):
    """A video that does not exist or cannot be decoded.

    The message is one line naming the file and what is wrong; `details` keeps ffmpeg's own output
    (its banner and log), which CLIs print only when asked (`--verbose`).
    """

    def __init__(self, path: str | Path, problem: str, details: str = ""):
        self.path, self.problem, self.details = str(path), problem, details
        super().__init__(f"video '{path}': {problem}")


def _check_video_path(path: Path) -> None:
    if not path.exists():
        raise BadVideoError(path, "not found; check the path")
    if path.is_dir():
        raise BadVideoError(path, "is a folder, not a video file; pass the video file itself")
    if not os.access(path, os.R_OK):
        raise BadVideoError(path, "cannot be read (permission denied)")
    if path.stat().st_size == 0:
        raise BadVideoError(path, "is empty (0 bytes); it is not a video")


def _ffmpeg_reason(err: BaseException) -> str:
    """The most telling line of an imageio/ffmpeg error (its message embeds ffmpeg's whole stderr)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    for line in reversed(lines):  # ffmpeg ends with "Error opening input...: Invalid data found when processing input"
        if "error" in line.lower() or "invalid" in line.lower() or "not found" in line.lower():
            return line.split(": ", 1)[-1].rstrip(".") if ": " in line else line
    return lines[0] if lines else type(err).__name__


def _bad_video(path: Path, err: BaseException, when: str) -> BadVideoError:
    reason = _ffmpeg_reason(err)
    return BadVideoError(path, f"cannot be {when} as a video ({reason}); is it a complete video file?",
                         details=str(err))


_DECODE_ERRORS = (OSError, RuntimeError, ValueError, IndexError)  # what imageio/ffmpeg raise on a bad file


def _open_reader(path: Path):  # -> imageio's FFMPEG reader
    """imageio's ffmpeg reader of `path`, or BadVideoError naming what is wrong."""
    import imageio.v2 as imageio

    _check_video_path(path)
    try:
        return imageio.get_reader(str(path), format="FFMPEG")
    except _DECODE_ERRORS as e:
        raise _bad_video(path, e, "opened") from e


class AtomicVideoWriter:
    """Write uint8 H×W×3 frames to `path` (mp4, libx264); the file appears only when closed cleanly.

    Frames go to a hidden temporary name beside the target and are renamed at the end, so an
    interrupted run leaves no half-written video under the final name.
    """

    def __init__(self, path: str | Path, fps: float, quality: int = 8):
        import imageio.v2 as imageio

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self._writer = imageio.get_writer(
            str(self.tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
            macro_block_size=1, ffmpeg_log_level="error",
        )
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        """Append one uint8 frame H×W×3."""
        self._writer.append_data(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self, success: bool = True) -> None:
        self._writer.close()
        if success and self.frames > 0:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> "AtomicVideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(success=exc_type is None)


def read_video_meta(path: str | Path, count: bool = True) -> dict:
    """Return {'fps', 'size' (W, H), 'nframes'} of a video file; `nframes` may be inf for streams, None
    with count=False (counting runs ffmpeg over the whole file).

    Raises `BadVideoError` (one line; ffmpeg's output in `.details`) if the path is missing, a folder, or not
    a decodable video.
    """
    path = Path(path)
    reader = _open_reader(path)
    try:
        meta = reader.get_meta_data()
        n = reader.count_frames() if count else None
    except _DECODE_ERRORS as e:
        raise _bad_video(path, e, "read") from e
    finally:
        reader.close()
    size = tuple(meta.get("size") or (0, 0))
    if min(size) <= 0:
        raise BadVideoError(path, "has no video stream (no frame size); is it an audio or other non-video file?",
                            details=repr(meta))
    return {"fps": float(meta.get("fps") or 0.0), "size": size, "nframes": n}


def iter_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield uint8 H×W×3 frames one at a time (streaming; the video is never fully in memory).

    Raises `BadVideoError` if the file cannot be opened or its data is corrupt part-way.
    """
    path = Path(path)
    reader = _open_reader(path)
    try:
        frames = iter(reader)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except _DECODE_ERRORS as e:
                raise _bad_video(path, e, "decoded") from e
            yield np.asarray(frame)[..., :3]
    finally:
        reader.close()
