"""Temporal smoothing of a video's face crops: each frame's EG3D crop box (and head pose) replaced by a local
linear fit over its neighbours, streamed over a centred window (pipelines/video_edit.py uses it)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from utils.face_alignment import CropBox


@dataclass
class FrameTrack:
    """One decoded frame and its detection: frame H×W×3 uint8; box/pose None when no face was found.

    pose = (yaw, pitch) in radians as offsets from frontal (see `estimate_yaw_pitch`).
    """

    index: int
    frame: np.ndarray
    box: CropBox | None = None
    pose: tuple[float, float] | None = None


def _compatible(a: CropBox, b: CropBox, max_shift: float = 0.5, max_ratio: float = 1.5) -> bool:
    """Whether box b plausibly tracks the same face as a (no scene cut / face switch in between)."""
    shift = math.hypot(a.center_x - b.center_x, a.center_y - b.center_y)
    ratio = max(a.size, b.size) / max(min(a.size, b.size), 1e-9)
    return shift <= max_shift * a.size and ratio <= max_ratio


def _local_linear(ts: np.ndarray, ys: np.ndarray, ws: np.ndarray, t0: float) -> np.ndarray:
    """Weighted least-squares line through (ts, ys) per column of ys, evaluated at t0 (the weighted mean
    when the times do not span a line). Unbiased for steady motion even when the window is one-sided."""
    sw = ws.sum()
    tm = (ws * ts).sum() / sw
    ym = (ws[:, None] * ys).sum(axis=0) / sw
    var = (ws * (ts - tm) ** 2).sum()
    if len(ts) < 3 or var < 1e-9:
        return ym
    slope = (ws[:, None] * (ts - tm)[:, None] * (ys - ym)).sum(axis=0) / var
    return ym + slope * (t0 - tm)


def smooth_window(tracks: list[FrameTrack], i: int, radius: int) -> FrameTrack:
    """Track `i` of `tracks` with its box (centre, log size) and pose replaced by a local linear fit
    over the detected neighbours within ±radius frames, with triangular weights. A linear fit rather
    than a mean, so steady head motion is not lagged at the ends of the clip or next to frames without
    a face. Neighbours far from the frame's own box (scene cut, another face) are left out.
    No face → returned as is."""
    me = tracks[i]
    if me.box is None or radius == 0:
        return me
    use = [t for t in tracks
           if t.box is not None and abs(t.index - me.index) <= radius and _compatible(me.box, t.box)]
    ts = np.array([t.index for t in use], dtype=np.float64)
    ws = np.array([radius + 1 - abs(t.index - me.index) for t in use], dtype=np.float64)
    ys = np.array([[t.box.center_x, t.box.center_y, math.log(t.box.size)] for t in use])
    cx, cy, logs = _local_linear(ts, ys, ws, float(me.index))
    box = CropBox(float(cx), float(cy), float(math.exp(logs)))
    pose = me.pose
    if me.pose is not None:
        with_pose = [k for k, t in enumerate(use) if t.pose is not None]
        yp = _local_linear(ts[with_pose], np.array([use[k].pose for k in with_pose]), ws[with_pose], float(me.index))
        pose = (float(yp[0]), float(yp[1]))
    return FrameTrack(me.index, me.frame, box, pose)


class CentredWindowSmoother:
    """Streaming centred-window smoothing: `push` a track, get back the tracks whose whole window
    (±radius frames) has been seen; `flush` at the end. Holds at most 2·radius+1 frames."""

    def __init__(self, radius: int):
        self.radius = int(radius)
        self._items: deque[FrameTrack] = deque()
        self._next = 0  # position in _items of the next track to emit

    def _drain(self, final: bool) -> list[FrameTrack]:
        out = []
        while self._next < len(self._items) and (final or len(self._items) - 1 - self._next >= self.radius):
            out.append(smooth_window(list(self._items), self._next, self.radius))
            self._next += 1
            while self._next > self.radius:
                self._items.popleft()
                self._next -= 1
        return out

    def push(self, track: FrameTrack) -> list[FrameTrack]:
        self._items.append(track)
        return self._drain(final=False)

    def flush(self) -> list[FrameTrack]:
        return self._drain(final=True)
