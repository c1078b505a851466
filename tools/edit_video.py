"""Edit a portrait video frame by frame with one prompt: align, edit, render, write (streaming).

    python -m tools.edit_video --video in.mp4 --ref style.png --out out.mp4 [--side-by-side]
    python -m tools.edit_video --video in.mp4 --prompt "turn him into a zombie" --camera orbit
    python -m tools.edit_video --video in.mp4 --ref style.png --random-init --tiny --device cpu   # smoke test

Per frame: MTCNN landmarks → EG3D crop box, smoothed over a centred window of ±`smooth_radius`
frames (so the crop does not jitter; frames are delayed by that many frames, never the whole video
in memory) → edited triplane (the prompt embedding is computed once for the whole video) → one
view rendered at the chosen camera. Frames without a face are held (the last edited frame is
repeated) or passed through (the input, framed like the last crop). The output is written at the
source frame rate to a temporary name and renamed at the end, so a killed run leaves no corrupt file.

The summary (one JSON line) gives frame counts, throughput and temporal stability: the mean
absolute frame-to-frame difference (uint8 levels, 0-255) of the edited frames and of the aligned
input crops they came from, over consecutive pairs of frames that both have a face.
docs/video_and_demo.md has the details.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, get_args

import numpy as np
import torch
from PIL import Image

from utils.face_alignment import CropBox, LandmarkDetector, crop_box, crop_image, estimate_yaw_pitch

CameraMode = Literal["frontal", "frame", "fixed", "orbit"]
NoFaceMode = Literal["hold", "pass"]
CAMERA_MODES: tuple[str, ...] = get_args(CameraMode)
NO_FACE_MODES: tuple[str, ...] = get_args(NoFaceMode)
DEFAULT_CHECKPOINT = "pretrained_models/3dpe.pt"


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
# Temporal smoothing of the crop
# --------------------------------------------------------------------------------------------------


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


def _pil_to_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images (same size) → N×3×H×W float32 in [-1,1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


def _to_u8(images: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1,1] → N×H×W×3 uint8 (the project's rounding)."""
    x = images.detach().float().cpu().clamp(-1, 1)
    return torch.round((x + 1.0) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def output_side(editor: Any) -> int:
    """Side of the editor's rendered image (512 for released weights; smaller for tiny models)."""
    return int(editor.renderer.config.img_resolution)


class _CameraPlan:
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
    extra: dict = field(default_factory=dict)

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
    plan = _CameraPlan(cfg)
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
        x = _pil_to_batch([crop for _, crop in batch])
        if editor.is_editing:
            p = resolve_prompt(x[:1])
            if p is None:
                raise ValueError("an editing checkpoint needs a prompt (--ref or --prompt)")
            planes = editor.edit(x, p)
        else:
            planes = editor.reconstruct(x)
        cams = torch.cat([plan(t) for t, _ in batch])
        return list(_to_u8(editor.render(planes, cams)["image"]))

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

        for index, frame in enumerate(_limit(frames, cfg.max_frames)):
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


def _limit(frames: Iterable[np.ndarray], n: int | None) -> Iterator[np.ndarray]:
    for i, f in enumerate(frames):
        if n is not None and i >= n:
            return
        yield f


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.edit_video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="input video (anything ffmpeg reads)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ref", default=None, help="reference image (the edit to apply)")
    g.add_argument("--prompt", default=None, help="text prompt (CLIP checkpoints; MAE ones go through InstructPix2Pix)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="3dpe.pt, a Live3D .pt, a project checkpoint dir or a Hub id ORG/NAME")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--side-by-side", action="store_true", help="write [aligned input | edit]")
    p.add_argument("--camera", choices=CAMERA_MODES, default="frontal")
    p.add_argument("--yaw", type=float, default=0.0, help="degrees from frontal (--camera fixed)")
    p.add_argument("--pitch", type=float, default=0.0, help="degrees from level (--camera fixed)")
    p.add_argument("--orbit-frames", type=int, default=120, help="frames per orbit loop (--camera orbit)")
    p.add_argument("--no-face", choices=NO_FACE_MODES, default="hold", help="frames without a face: hold the last edit or pass the input")
    p.add_argument("--smooth-radius", type=int, default=4, help="crop smoothing window ±frames (0: off)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None, help="aligned crop side (default: the encoder's, 512)")
    p.add_argument("--min-confidence", type=float, default=0.9, help="face detector threshold")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="on an error, also print the details (ffmpeg's own output for an unreadable video)")
    p.add_argument("--random-init", action="store_true", help="random weights: checks the pipeline, output is noise")
    p.add_argument("--random-init-kind", choices=["edit", "reconstruct"], default="edit")
    p.add_argument("--prompt-encoder", choices=["mae", "clip"], default="mae", help="with --random-init")
    p.add_argument("--tiny", action="store_true", help="with --random-init: tiny models (smoke tests)")
    b = p.add_argument_group("InstructPix2Pix bridge (--prompt with a MAE checkpoint such as 3dpe.pt)")
    b.add_argument("--ip2p-model", default="timbrooks/instruct-pix2pix")
    b.add_argument("--ip2p-steps", type=int, default=20)
    b.add_argument("--ip2p-guidance", type=float, default=7.5)
    b.add_argument("--ip2p-image-guidance", type=float, default=1.5)
    return p.parse_args(argv)


def build_prompt(editor: Any, ref: str | Path | None, text: str | None, size: int | None = None) -> PromptLike:
    """The prompt for `edit_video`: an embedding computed now (reference image, centre-cropped and
    resized to `size` or the editor's input resolution; CLIP text), a callable that edits the first
    aligned face with InstructPix2Pix (text + MAE checkpoint), or None (reconstruction)."""
    if not editor.is_editing:
        if ref is not None or text is not None:
            print("warning: this checkpoint reconstructs (Live3D); the prompt is ignored", file=sys.stderr)
        return None
    if ref is None and text is None:
        raise ValueError("this checkpoint edits: give --ref IMAGE or --prompt TEXT")
    if ref is not None:
        import warnings

        from datasets.inference_inputs import prepare_portrait
        from utils.image_io import load_image, pil_to_tensor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = prepare_portrait(load_image(ref), size or editor.input_resolution, name=str(ref))
        return editor.encode_prompt(reference=pil_to_tensor(img))
    if editor.prompt_encoder_kind == "clip":
        return editor.encode_prompt(text=text)
    return lambda first_face: editor.encode_prompt(text=text, image=first_face)


def run(argv: list[str] | None = None) -> dict:
    """Run the CLI; print and return the summary dict (`ok` False on a user error, with `error`)."""
    args = parse_args(argv)
    from models.hub import is_local_or_hub
    from pipelines.instruct_pix2pix import bridge_from_args
    from pipelines.editor import PortraitEditor
    from utils.device import resolve_device
    from utils.errors import ThreeDPEError
    from utils.face_alignment import MTCNNDetector
    from utils.video import BadVideoError, read_video_meta

    def fail(msg: str, details: str = "") -> dict:
        hint = " (--verbose shows the details)" if details and not args.verbose else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        if details and args.verbose:
            print(details, file=sys.stderr)
        return {"ok": False, "error": msg, "output": args.out}

    try:  # before any model is loaded: a bad path fails in a second, with one line
        read_video_meta(args.video, count=False)
    except BadVideoError as e:
        return fail(str(e), e.details)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    bridge = bridge_from_args(args, device) if args.prompt is not None else None
    try:
        if args.random_init:
            editor = PortraitEditor.random_init(kind=args.random_init_kind, tiny=args.tiny, seed=args.seed,
                                                prompt_encoder=args.prompt_encoder, device=device,
                                                precision=args.precision, text_bridge=bridge)
            print("WARNING: --random-init: random weights, the frames are noise (this only checks the pipeline).",
                  file=sys.stderr)
        else:
            if not is_local_or_hub(args.checkpoint):
                return fail(f"checkpoint '{args.checkpoint}' not found. Download 3dpe.pt (README 'Pretrained "
                            "models') into pretrained_models/ or pass --checkpoint; --random-init checks the install.")
            editor = PortraitEditor.from_pretrained(args.checkpoint, device=device, precision=args.precision,
                                                    text_bridge=bridge)
        prompt = build_prompt(editor, args.ref, args.prompt, args.input_size)
        cfg = VideoEditConfig(camera=args.camera, yaw=args.yaw, pitch=args.pitch, orbit_frames=args.orbit_frames,
                              batch_size=args.batch_size, smooth_radius=args.smooth_radius, no_face=args.no_face,
                              side_by_side=args.side_by_side, max_frames=args.max_frames,
                              input_size=args.input_size)
        detector = MTCNNDetector(device=device, min_confidence=args.min_confidence)
        summary = edit_video(args.video, args.out, editor, prompt, detector, cfg,
                             progress=not args.no_progress).to_dict()
    except (ThreeDPEError, ValueError, OSError) as e:
        return fail(str(e), getattr(e, "details", ""))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when the edited video was written, 1 otherwise (the reason is one line on stderr)."""
    return 0 if run(argv).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
