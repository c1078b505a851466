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
docs/video_and_demo.md has the details; the loop itself is pipelines/video_edit.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.portraits import PortraitPreparer
from pipelines.video_edit import CAMERA_MODES, NO_FACE_MODES, VideoEditConfig, VideoEditSummary, edit_video
from tools.editor_options import EditorOptions, add_editor_arguments

if TYPE_CHECKING:
    import torch

    from pipelines.editor import PortraitEditor

__all__ = ["VideoEditConfig", "VideoEditSummary", "edit_video", "main", "parse_args", "run", "video_prompt"]


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
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="on an error, also print the details (ffmpeg's own output for an unreadable video)")
    add_editor_arguments(p)
    return p.parse_args(argv)


def video_prompt(editor: PortraitEditor, ref: str | Path | None, text: str | None,
                 size: int | None = None) -> tuple[torch.Tensor | None, str | None]:
    """The edit `edit_video` is given: (reference 1×3×R×R, None) for --ref (centre-cropped and resized to `size` or
    the editor's input resolution, not aligned), (None, text) for --prompt, (None, None) for a reconstruction
    checkpoint (which ignores a prompt, with a warning). The editor encodes it on its first call."""
    if not editor.is_editing:
        if ref is not None or text is not None:
            print("warning: this checkpoint reconstructs (Live3D); the prompt is ignored", file=sys.stderr)
        return None, None
    if ref is None and text is None:
        raise ValueError("this checkpoint edits: give --ref IMAGE or --prompt TEXT")
    if ref is None:
        return None, text
    return PortraitPreparer.for_editor(editor, size)(ref).tensor, None


def run(argv: list[str] | None = None) -> dict:
    """Run the CLI; print and return the summary dict (`ok` False on a user error, with `error`)."""
    args = parse_args(argv)
    from utils.errors import ThreeDPEError, report_user_error
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
    try:
        editor = EditorOptions.from_args(args).build(needs_text=args.prompt is not None)
    except ThreeDPEError as e:  # a missing checkpoint, a Hub id not cached offline: one line, exit status 2
        report_user_error(e)
        return {"ok": False, "error": str(e), "output": args.out, "exit_code": 2}
    try:
        reference, text = video_prompt(editor, args.ref, args.prompt, args.input_size)
        cfg = VideoEditConfig(camera=args.camera, yaw=args.yaw, pitch=args.pitch, orbit_frames=args.orbit_frames,
                              batch_size=args.batch_size, smooth_radius=args.smooth_radius, no_face=args.no_face,
                              side_by_side=args.side_by_side, max_frames=args.max_frames,
                              input_size=args.input_size)
        detector = MTCNNDetector(device=editor.device, min_confidence=args.min_confidence)
        summary = edit_video(args.video, args.out, editor, None, detector, cfg, progress=not args.no_progress,
                             reference=reference, text=text).to_dict()
    except (ThreeDPEError, ValueError, OSError) as e:
        return fail(str(e), getattr(e, "details", ""))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when the edited video was written, 2 when the checkpoint cannot be had, 1 otherwise (the
    reason is one line on stderr)."""
    summary = run(argv)
    return 0 if summary.get("ok") else summary.get("exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
