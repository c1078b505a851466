"""Video writing and reading with imageio/ffmpeg; a killed run never leaves a corrupt file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np


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


def read_video_meta(path: str | Path) -> dict:
    """Return {'fps', 'size' (W, H), 'nframes' (may be inf for streams)} of a video file."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        n = reader.count_frames()
    finally:
        reader.close()
    return {"fps": float(meta.get("fps", 0.0)), "size": tuple(meta.get("size", (0, 0))), "nframes": n}


def iter_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield uint8 H×W×3 frames one at a time (streaming; the video is never fully in memory)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        for frame in reader:
            yield np.asarray(frame)[..., :3]
    finally:
        reader.close()
