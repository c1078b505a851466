"""Edit a portrait video frame by frame with one prompt: align, edit, render, write (streaming).

Per frame: landmarks → EG3D crop box, smoothed over a centred window of ±`smooth_radius` frames
(pipelines/crop_tracking.py; frames are delayed by that many frames, never the whole video in memory) →
edited triplane (the prompt embedding is computed once for the whole video) → one view rendered at the
chosen camera. Frames without a face are held (the last edited frame is repeated) or passed through (the
input, framed like the last crop). The output is written at the source frame rate to a temporary name and
renamed at the end, so a killed run leaves no corrupt file. The command is `python -m tools.edit_video`;
docs/video_and_demo.md has the details.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args, Iterable, Literal

import numpy as np
import torch
from PIL import Image

from pipelines.crop_tracking import CentredWindowSmoother, FrameTrack
from utils.face_alignment import LandmarkDetector, crop_box, crop_image, estimate_yaw_pitch
from utils.image_io import pil_to_tensor, tensor_to_uint8

CameraMode = Literal["frontal", "frame", "fixed", "orbit"]
NoFaceMode = Literal["hold", "pass"]
CAMERA_MODES: tuple[str, ...] = get_args(CameraMode)
NO_FACE_MODES: tuple[str, ...] = get_args(NoFaceMode)


@dataclass
class VideoEditConfig:
    """Options of `edit_video`.

    camera: 'frontal' (the EG3D crop's frontal camera), 'frame' (each frame's own head pose, estimated
        from the landmarks and smoothed), 'fixed' (yaw/pitch below) or 'orbit' (the original's orbit
        path, one loop every `orbit_frames` frames).
    yaw, pitch: degrees from frontal for 'fixed' (yaw > 0: camera to the face's +x side; pitch > 0:
        camera below the face).
    batch_size: aligned frames per encoder/renderer call.
    smooth_radius: the crop box (centre, log size) and the pose are smoothed by a local linear fit
        over ±smooth_radius frames with triangular weights (0: no smoothing); output is delayed by
        that many frames. Neighbours far from the frame's own box (a scene cut, another face) are left out.
    no_face: 'hold' repeats the last edited frame (the input if there is none yet); 'pass' writes
        the input, framed by the last crop box (centre square before any face).
    side_by_side: write [aligned input | edited] frames, twice as wide.
    max_frames: stop after this many frames (None: the whole video).
    input_size: side of the aligned crops given to the encoder (None: the editor's input resolution,
        512 for released weights; tests use small sides with tiny models).
    focal: render focal length (None: FOCAL_3DPE, the original 3DPE/Live3D cameras).
    """

    camera: CameraMode = "frontal"
    yaw: float = 0.0
    pitch: float = 0.0
    orbit_frames: int = 120
    batch_size: int = 4
    smooth_radius: int = 4
    no_face: NoFaceMode = "hold"
    side_by_side: bool = False
    max_frames: int | None = None
    input_size: int | None = None  # side of the aligned crop fed to the encoder; None: editor.input_resolution
    focal: float | None = None

    def validate(self) -> None:
        if self.camera not in CAMERA_MODES:
            raise ValueError(f"camera must be one of {CAMERA_MODES}, got {self.camera!r}")
        if self.no_face not in NO_FACE_MODES:
            raise ValueError(f"no_face must be one of {NO_FACE_MODES}, got {self.no_face!r}")
        if self.batch_size < 1 or self.smooth_radius < 0 or self.orbit_frames < 1:
            raise ValueError("batch_size and orbit_frames must be ≥ 1, smooth_radius ≥ 0")


# --------------------------------------------------------------------------------------------------
# Framing helpers
# --------------------------------------------------------------------------------------------------


def centre_square(frame: np.ndarray, side: int) -> np.ndarray:
    """Largest centred square of an H×W×3 uint8 frame, resized to side² (BICUBIC) → side×side×3 uint8."""
    h, w = frame.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(frame[top : top + s, left : left + s])
    return np.asarray(img.resize((side, side), Image.BICUBIC))


def _resize_u8(arr: np.ndarray, side: int) -> np.ndarray:
    if arr.shape[0] == side and arr.shape[1] == side:
        return arr
    return np.asarray(Image.fromarray(arr).resize((side, side), Image.BICUBIC))


def output_side(editor: Any) -> int:
    """Side of the editor's rendered image (512 for released weights; smaller for tiny models)."""
    return int(editor.renderer.config.img_resolution)


class CameraPlan:
    """The render camera of each frame (V×25 rows) for a `VideoEditConfig`."""

    def __init__(self, cfg: VideoEditConfig):
        from utils import cameras

        self.cfg = cfg
        self.cameras = cameras
        self.focal = cameras.FOCAL_3DPE if cfg.focal is None else cfg.focal
        self._fixed = None
        self._orbit = None
        if cfg.camera == "frontal":
            self._fixed = self._look(0.0, 0.0)
        elif cfg.camera == "fixed":
            self._fixed = self._look(math.radians(cfg.yaw), math.radians(cfg.pitch))
        elif cfg.camera == "orbit":
            self._orbit = cameras.orbit_cameras(cfg.orbit_frames)

    def _look(self, yaw: float, pitch: float) -> torch.Tensor:
        return self.cameras.look_at_cameras(math.pi / 2 + yaw, math.pi / 2 + pitch, focal=self.focal).reshape(1, 25)

    def __call__(self, track: FrameTrack) -> torch.Tensor:
        if self._fixed is not None:
            return self._fixed
        if self._orbit is not None:
            return self._orbit[track.index % self._orbit.shape[0]].reshape(1, 25)
        yaw, pitch = track.pose if track.pose is not None else (0.0, 0.0)
        return self._look(yaw, pitch)



# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class VideoEditSummary:
    """What `edit_video` did. Stability figures are mean |frame_t − frame_{t−1}| in uint8 levels over
    consecutive pairs of frames that both have a face: of the edited output, of the aligned input crops
    (at the output size), and their ratio (output / input; ≈1 means the edit adds no flicker)."""

    output: str
    frames: int = 0
    edited: int = 0
    no_face: int = 0
    no_face_mode: str = "hold"
    fps: float = 0.0
    size: tuple[int, int] = (0, 0)
    camera: CameraMode = "frontal"
    seconds: float = 0.0
    frames_per_second: float = 0.0
    output_mean_abs_diff: float | None = None
    input_mean_abs_diff: float | None = None
    stability_ratio: float | None = None
    ok: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


class _Stability:
    def __init__(self):
        self.prev: tuple[np.ndarray, np.ndarray] | None = None
        self.out_sum = self.in_sum = 0.0
        self.pairs = 0

    def add(self, out: np.ndarray | None, inp: np.ndarray | None) -> None:
        """out/inp: the edited frame and its aligned input (side×side×3 uint8), or None (no face)."""
        if out is None or inp is None:
            self.prev = None
            return
        cur = (out.astype(np.int16), inp.astype(np.int16))
        if self.prev is not None:
            self.out_sum += float(np.abs(cur[0] - self.prev[0]).mean())
            self.in_sum += float(np.abs(cur[1] - self.prev[1]).mean())
            self.pairs += 1
        self.prev = cur

    def result(self) -> tuple[float | None, float | None, float | None]:
        if self.pairs == 0:
            return None, None, None
        o, i = self.out_sum / self.pairs, self.in_sum / self.pairs
        return round(o, 4), round(i, 4), (round(o / i, 4) if i > 0 else None)


PromptLike = Any  # PromptEmbedding, a callable (first aligned face 1×3×H×W) -> PromptEmbedding, or None


def edit_video(
    video: str | Path,
    out: str | Path,
    editor: Any,
    prompt: PromptLike,
    detector: LandmarkDetector,
    cfg: VideoEditConfig | None = None,
    progress: bool = True,
    frames: Iterable[np.ndarray] | None = None,
    fps: float | None = None,
) -> VideoEditSummary:
    """Edit every frame of `video` and write `out` (mp4, libx264, the source frame rate).

    Args:
        editor: a `PortraitEditor` (an editing checkpoint needs a prompt; a Live3D one reconstructs).
        prompt: a `PromptEmbedding` computed once, or a callable taking the first aligned face
            (1×3×R×R in [-1,1]) and returning one (called once: the InstructPix2Pix bridge edits the
            first frame's face and the edit becomes the reference), or None for reconstruction.
        detector: finds faces in RGB PIL frames (`MTCNNDetector`, or any `LandmarkDetector`).
        frames, fps: decoded frames (H×W×3 uint8) and rate instead of reading `video` (tests, pipes).
    Returns:
        a `VideoEditSummary`. The output appears under `out` only when every frame was written.
    """
    from utils.video import AtomicVideoWriter, iter_video_frames, read_video_meta

    cfg = cfg or VideoEditConfig()
    cfg.validate()
    total = None
    if frames is None:
        meta = read_video_meta(video)
        fps = meta["fps"] if fps is None else fps
        total = meta["nframes"] if isinstance(meta["nframes"], int) else None
        frames = iter_video_frames(video)
    if not fps or fps <= 0:
        raise ValueError(f"{video}: unknown frame rate; pass fps")
    if cfg.max_frames is not None:
        total = cfg.max_frames if total is None else min(total, cfg.max_frames)

    side = output_side(editor)
    res = cfg.input_size or editor.input_resolution
    plan = CameraPlan(cfg)
    smoother = CentredWindowSmoother(cfg.smooth_radius)
    stability = _Stability()
    summary = VideoEditSummary(output=str(out), no_face_mode=cfg.no_face, fps=float(fps), camera=cfg.camera)
    state: dict[str, Any] = {"prompt": prompt, "last_out": None, "last_box": None}

    def resolve_prompt(first_face: torch.Tensor):
        p = state["prompt"]
        if callable(p) and not isinstance(p, torch.Tensor) and not hasattr(p, "tokens"):
            p = state["prompt"] = p(first_face)
        return p

    def input_view(track: FrameTrack) -> np.ndarray:
        box = track.box or state["last_box"]
        if box is None:
            return centre_square(track.frame, side)
        return np.asarray(crop_image(Image.fromarray(track.frame), box, side))

    def run_batch(batch: list[tuple[FrameTrack, Image.Image]]) -> list[np.ndarray]:
        x = torch.cat([pil_to_tensor(crop) for _, crop in batch])
        if editor.is_editing:
            p = resolve_prompt(x[:1])
            if p is None:
                raise ValueError("an editing checkpoint needs a prompt (--ref or --prompt)")
            planes = editor.edit(x, p)
        else:
            planes = editor.reconstruct(x)
        cams = torch.cat([plan(t) for t, _ in batch])
        return [tensor_to_uint8(v) for v in editor.render(planes, cams)["image"]]

    def emit(pending: list[FrameTrack], crops: dict[int, Image.Image], writer: AtomicVideoWriter) -> None:
        faces = [(t, crops[t.index]) for t in pending if t.box is not None]
        edited = {}
        if faces:
            edited = {t.index: o for (t, _), o in zip(faces, run_batch(faces))}
        for t in pending:
            if t.box is not None:
                state["last_box"] = t.box
                frame = _resize_u8(edited[t.index], side)
                inp = _resize_u8(np.asarray(crops[t.index]), side)
                state["last_out"] = frame
                summary.edited += 1
                stability.add(frame, inp)
            else:
                summary.no_face += 1
                inp = input_view(t)
                frame = state["last_out"] if cfg.no_face == "hold" and state["last_out"] is not None else inp
                stability.add(None, None)
            writer.append(np.concatenate([inp, frame], axis=1) if cfg.side_by_side else frame)
            summary.frames += 1

    def detect(index: int, frame: np.ndarray) -> FrameTrack:
        faces = detector.detect(Image.fromarray(frame))
        if not faces:
            return FrameTrack(index, frame)
        lm = faces[0].landmarks
        try:
            box = crop_box(lm, frame.shape[0])
        except ValueError:
            return FrameTrack(index, frame)
        pose = estimate_yaw_pitch(lm) if cfg.camera == "frame" else None
        return FrameTrack(index, frame, box, pose)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="editing video", unit="frame", file=sys.stderr)
    t0 = time.perf_counter()
    pending: list[FrameTrack] = []
    crops: dict[int, Image.Image] = {}
    with AtomicVideoWriter(out, fps=fps) as writer:

        def take(ready: list[FrameTrack]) -> None:
            for t in ready:
                if t.box is not None:
                    crops[t.index] = crop_image(Image.fromarray(t.frame), t.box, res)
                pending.append(t)
            n_faces = sum(t.box is not None for t in pending)
            if n_faces >= cfg.batch_size or len(pending) >= 4 * cfg.batch_size:
                emit(pending, crops, writer)
                if bar is not None:
                    bar.update(len(pending))
                pending.clear()
                crops.clear()

        for index, frame in enumerate(itertools.islice(frames, cfg.max_frames)):
            frame = np.ascontiguousarray(np.asarray(frame)[..., :3], dtype=np.uint8)
            take(smoother.push(detect(index, frame)))
        take(smoother.flush())
        if pending:
            emit(pending, crops, writer)
            if bar is not None:
                bar.update(len(pending))
        if summary.frames == 0:
            raise ValueError(f"{video}: no frames decoded")
    if bar is not None:
        bar.close()
    summary.seconds = round(time.perf_counter() - t0, 3)
    summary.frames_per_second = round(summary.frames / max(summary.seconds, 1e-9), 4)
    summary.size = (side * (2 if cfg.side_by_side else 1), side)
    summary.output_mean_abs_diff, summary.input_mean_abs_diff, summary.stability_ratio = stability.result()
    return summary

