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

import contextlib
import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, get_args

import numpy as np
import torch
from PIL import Image

from pipelines.crop_tracking import CentredWindowSmoother, FrameTrack
from pipelines.portraits import portrait_side
from utils.face_alignment import CropBox, LandmarkDetector, crop_box, crop_image, estimate_yaw_pitch
from utils.image_io import pil_to_tensor, tensor_to_uint8

if TYPE_CHECKING:
    from pipelines.editor import PortraitEditor, PromptEmbedding

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


def edit_video(
    video: str | Path,
    out: str | Path,
    editor: PortraitEditor,
    prompt: PromptEmbedding | None,
    detector: LandmarkDetector,
    cfg: VideoEditConfig | None = None,
    progress: bool = True,
    frames: Iterable[np.ndarray] | None = None,
    fps: float | None = None,
    *,
    reference: torch.Tensor | None = None,
    text: str | None = None,
) -> VideoEditSummary:
    """Edit every frame of `video` and write `out` (mp4, libx264, the source frame rate).

    Args:
        editor: a `PortraitEditor` (an editing checkpoint needs a prompt; a Live3D one reconstructs).
        prompt: an embedding made beforehand, or None: then `reference` (1×3×R×R in [-1,1]) or `text` is
            encoded by the editor's first call, with the first aligned face as `prompt_image` (a text through
            InstructPix2Pix edits that face, and its edit is the reference), and that one embedding serves
            every frame. All None: reconstruction.
        detector: finds faces in RGB PIL frames (`MTCNNDetector`, or any `LandmarkDetector`).
        frames, fps: decoded frames (H×W×3 uint8) and rate instead of reading `video` (tests, pipes).
    Returns:
        a `VideoEditSummary`. The output appears under `out` only when every frame was written.
    """
    from utils.video import AtomicVideoWriter

    cfg = cfg or VideoEditConfig()
    cfg.validate()
    frames, fps, total = _open_frames(video, frames, fps, cfg.max_frames)
    summary = VideoEditSummary(output=str(out), no_face_mode=cfg.no_face, fps=float(fps), camera=cfg.camera)
    run = _VideoRun(editor, detector, cfg, summary, prompt, reference, text)
    smoother = CentredWindowSmoother(cfg.smooth_radius)
    t0 = time.perf_counter()
    with AtomicVideoWriter(out, fps=fps) as writer, _progress_bar(total, progress) as bar:
        for index, frame in enumerate(itertools.islice(frames, cfg.max_frames)):
            frame = np.ascontiguousarray(np.asarray(frame)[..., :3], dtype=np.uint8)
            run.take(smoother.push(run.detect(index, frame)), writer, bar)
        run.take(smoother.flush(), writer, bar, last=True)
        if run.summary.frames == 0:
            raise ValueError(f"{video}: no frames decoded")
    return run.finish(time.perf_counter() - t0)


def _open_frames(video: str | Path, frames: Iterable[np.ndarray] | None, fps: float | None,
                 max_frames: int | None) -> tuple[Iterable[np.ndarray], float, int | None]:
    """(frames, frame rate, frame count or None when unknown): the given frames, else those of `video`."""
    from utils.video import iter_video_frames, read_video_meta

    total = None
    if frames is None:
        meta = read_video_meta(video)
        fps = meta["fps"] if fps is None else fps
        total = meta["nframes"] if isinstance(meta["nframes"], int) else None
        frames = iter_video_frames(video)
    if not fps or fps <= 0:
        raise ValueError(f"{video}: unknown frame rate; pass fps")
    if max_frames is not None:
        total = max_frames if total is None else min(total, max_frames)
    return frames, fps, total


def _progress_bar(total: int | None, progress: bool) -> Any:
    """A bar over the frames on stderr (a context manager giving None when not `progress`)."""
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc="editing video", unit="frame", file=sys.stderr)


class _VideoRun:
    """The state of one `edit_video` run, in named attributes: the frames waiting for their batch (`pending`,
    their aligned crops in `crops`), the last edited frame and crop box (held for frames without a face), the
    prompt embedding once made, and what the summary counts."""

    def __init__(self, editor: PortraitEditor, detector: LandmarkDetector, cfg: VideoEditConfig,
                 summary: VideoEditSummary, prompt: PromptEmbedding | None, reference: torch.Tensor | None,
                 text: str | None):
        self.editor, self.detector, self.cfg, self.summary = editor, detector, cfg, summary
        self.prompt, self.reference, self.text = prompt, reference, text
        self.side = output_side(editor)
        self.res = portrait_side(editor, cfg.input_size)
        self.plan = CameraPlan(cfg)
        self.stability = _Stability()
        self.pending: list[FrameTrack] = []
        self.crops: dict[int, Image.Image] = {}
        self.last_out: np.ndarray | None = None
        self.last_box: CropBox | None = None

    def detect(self, index: int, frame: np.ndarray) -> FrameTrack:
        """The frame with its EG3D crop box (and, for camera 'frame', its head pose); no box without a face."""
        faces = self.detector.detect(Image.fromarray(frame))
        if not faces:
            return FrameTrack(index, frame)
        lm = faces[0].landmarks
        try:
            box = crop_box(lm, frame.shape[0])
        except ValueError:
            return FrameTrack(index, frame)
        pose = estimate_yaw_pitch(lm) if self.cfg.camera == "frame" else None
        return FrameTrack(index, frame, box, pose)

    def take(self, ready: list[FrameTrack], writer: Any, bar: Any, last: bool = False) -> None:
        """Queue the smoothed frames; write the queue once it holds a batch of faces (or `last`)."""
        for t in ready:
            if t.box is not None:
                self.crops[t.index] = crop_image(Image.fromarray(t.frame), t.box, self.res)
            self.pending.append(t)
        bs = self.cfg.batch_size
        full = sum(t.box is not None for t in self.pending) >= bs or len(self.pending) >= 4 * bs
        if self.pending and (full or last):
            self._write(writer)
            if bar is not None:
                bar.update(len(self.pending))
            self.pending.clear()
            self.crops.clear()

    def _write(self, writer: Any) -> None:
        """Edit the queued faces in one batch and write every queued frame in order."""
        faces = [t for t in self.pending if t.box is not None]
        edited = dict(zip([t.index for t in faces], self._edit(faces))) if faces else {}
        for t in self.pending:
            frame, inp = self._edited(t, edited[t.index]) if t.box is not None else self._held(t)
            writer.append(np.concatenate([inp, frame], axis=1) if self.cfg.side_by_side else frame)
            self.summary.frames += 1

    def _edit(self, faces: list[FrameTrack]) -> list[np.ndarray]:
        """The editor's call on the faces' crops, each rendered at its frame's camera → side×side×3 uint8 frames."""
        x = torch.cat([pil_to_tensor(self.crops[t.index]) for t in faces])
        cameras = torch.cat([self.plan(t) for t in faces])[:, None]  # N×1×25: each frame at its own camera
        result = self.editor(x, reference=self.reference, text=self.text, prompt=self.prompt, prompt_image=x[:1],
                             cameras=cameras)
        self.prompt = result.reusable_prompt  # made from the first face: it serves every later frame
        return [tensor_to_uint8(v) for v in result.views["image"][:, 0]]

    def _edited(self, t: FrameTrack, edited: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(output frame, aligned input) of a frame with a face."""
        self.last_box = t.box
        frame = _resize_u8(edited, self.side)
        inp = _resize_u8(np.asarray(self.crops[t.index]), self.side)
        self.last_out = frame
        self.summary.edited += 1
        self.stability.add(frame, inp)
        return frame, inp

    def _held(self, t: FrameTrack) -> tuple[np.ndarray, np.ndarray]:
        """(output frame, input view) of a frame without a face: the last edit ('hold') or the input ('pass'),
        the input framed by the last crop box (the centre square before any face)."""
        self.summary.no_face += 1
        box = self.last_box
        inp = centre_square(t.frame, self.side) if box is None else np.asarray(
            crop_image(Image.fromarray(t.frame), box, self.side))
        frame = self.last_out if self.cfg.no_face == "hold" and self.last_out is not None else inp
        self.stability.add(None, None)
        return frame, inp

    def finish(self, seconds: float) -> VideoEditSummary:
        """The summary, with the run's time, throughput, output size and stability figures."""
        s = self.summary
        s.seconds = round(seconds, 3)
        s.frames_per_second = round(s.frames / max(s.seconds, 1e-9), 4)
        s.size = (self.side * (2 if self.cfg.side_by_side else 1), self.side)
        s.output_mean_abs_diff, s.input_mean_abs_diff, s.stability_ratio = self.stability.result()
        return s
