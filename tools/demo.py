"""Interactive editing demo (Gradio): portrait + reference image or text → edited views, an orbit
video, and yaw/pitch sliders that re-render the cached triplane without re-encoding.

    pip install gradio                       # optional dependency, not in requirements.txt
    python -m tools.demo --checkpoint pretrained_models/3dpe.pt [--device cuda] [--port 7860] [--share]
    python -m tools.demo --random-init --tiny    # try the UI without weights (random weights: the pictures show no face)

The app binds to 127.0.0.1; `--share` (off by default) asks Gradio for a public link. All the logic is
in `DemoSession`, a plain class usable (and tested) without Gradio. One session serves the app: it is
a local, one-user demo (requests are serialised by a lock).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.portraits import Portrait, PortraitPreparer
from tools.editor_options import EditorOptions, add_editor_arguments

GRADIO_MISSING = (
    "The demo needs Gradio, an optional dependency: pip install gradio\n"
    "(everything else in the project works without it; DemoSession in tools/demo.py is usable directly)."
)


def import_gradio() -> Any:
    """Import gradio, or raise ImportError with install instructions."""
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError(GRADIO_MISSING) from e
    return gr


def _image_key(img: Image.Image) -> str:
    return hashlib.sha1(np.asarray(img).tobytes() + repr(img.size).encode()).hexdigest()


class DemoSession:
    """State of one interactive session: an aligned portrait, a prompt, the cached edited triplane.

    The triplane is encoded once per (portrait, prompt) pair; `rerender` only renders.
    `encode_count` counts encoder runs (edits/reconstructions), `render_count` renderer calls.
    """

    def __init__(
        self,
        editor: Any,
        detector: Any | None = None,
        view_yaws_deg: tuple[float, ...] = (-30.0, 0.0, 30.0),
        orbit_frames: int = 48,
        orbit_fps: float = 24.0,
        work_dir: str | Path | None = None,
        input_size: int | None = None,
    ):
        self.editor = editor
        self._prepare = PortraitPreparer.for_editor(editor, input_size, align=True, detector=detector)
        self.input_size = self._prepare.size  # side of the aligned portrait
        self.view_yaws_deg = tuple(view_yaws_deg)
        self.orbit_frames = int(orbit_frames)
        self.orbit_fps = float(orbit_fps)
        # Without a work_dir the session owns a temporary folder, removed by close() (also on `with` exit, at
        # garbage collection and at interpreter exit: TemporaryDirectory's finaliser).
        self._tmp = tempfile.TemporaryDirectory(prefix="threedpe_demo_") if work_dir is None else None
        self.work_dir = Path(self._tmp.name if self._tmp is not None else work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.portrait: torch.Tensor | None = None  # 1×3×R×R in [-1,1]
        self.portrait_image: Image.Image | None = None
        self.message = ""
        self.reference: torch.Tensor | None = None
        self.text: str | None = None
        self.planes: torch.Tensor | None = None  # 1×96×256×256 (cached edit)
        self.prompt_reference: Image.Image | None = None  # the reference actually used (e.g. an IP2P edit)
        self.encode_count = 0
        self.render_count = 0
        self._portrait_key: str | None = None
        self._prompt_key: tuple | None = None
        self._planes_key: tuple | None = None
        self._embedding: Any = None
        self._orbit_count = 0

    def close(self) -> None:
        """Remove the session's temporary folder (the orbit videos) if it made one; a given work_dir is kept.
        Safe to call more than once."""
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "DemoSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ inputs
    @property
    def detector(self) -> Any:
        """The face detector (MTCNN on the editor's device unless one was given; made on first use)."""
        return self._prepare.detector

    def _align(self, image: Any, what: str) -> tuple[Portrait, str]:
        """EG3D crop of the main face at the encoder's resolution; a centre crop if no face is found."""
        portrait = self._prepare(image, needs_face=False, name=what)
        if portrait.aligned:
            return portrait, f"{what}: face found (score {portrait.face_score:.3f}) and aligned to the EG3D crop."
        return portrait, (f"{what}: no face found; using a centre crop (results are best on a clear, "
                          "roughly frontal face).")

    def set_portrait(self, image: Any) -> Image.Image:
        """Align and keep the portrait (PIL / uint8 array / path). Returns the aligned R×R RGB image;
        `self.message` says whether a face was found or a centre crop was used."""
        with self.lock:
            aligned, self.message = self._align(image, "portrait")
            key = _image_key(aligned.image)
            if key != self._portrait_key:
                self.portrait_image = aligned.image
                self.portrait = aligned.tensor
                self._portrait_key = key
                self.planes = None
            return aligned.image

    def set_prompt(self, reference: Any | None = None, text: str | None = None) -> None:
        """Set the edit: a reference image (aligned like the portrait) and/or a text. The encoded prompt
        and triplane are kept if the prompt did not change."""
        text = text.strip() if isinstance(text, str) and text.strip() else None
        with self.lock:
            ref, ref_key = None, None
            if reference is not None:
                ref, self.message = self._align(reference, "reference")
                ref_key = _image_key(ref.image)
            key = (ref_key, text)
            if key == self._prompt_key:
                return
            if self.editor.is_editing and reference is None and text is None:
                raise ValueError("give a reference image or a text prompt")
            self.reference = None if ref is None else ref.tensor
            self.text = text
            self._prompt_key = key
            self._embedding = None
            self.planes = None

    # ------------------------------------------------------------------ encode / render
    def _encode(self) -> torch.Tensor:
        """Edited (or reconstructed) triplane of the portrait, cached per (portrait, prompt); the prompt
        embedding is kept for the next portrait when the editor says it can be (`EditResult.reusable_prompt`)."""
        if self.portrait is None:
            raise ValueError("set a portrait first")
        key = (self._portrait_key, self._prompt_key)
        if self.planes is not None and self._planes_key == key:
            return self.planes
        ed = self.editor
        if ed.is_editing and self._prompt_key is None:
            raise ValueError("set a reference image or a text prompt first")
        prompt = dict(reference=self.reference, text=self.text, prompt=self._embedding) if ed.is_editing else {}
        result = ed(self.portrait, **prompt)
        self._embedding = result.reusable_prompt
        if result.reference(0) is not None:
            from utils.image_io import to_pil

            self.prompt_reference = to_pil(result.reference(0).cpu())
        self.encode_count += 1
        self.planes, self._planes_key = result.triplanes[:1], key
        return self.planes

    def _render(self, cameras: torch.Tensor) -> torch.Tensor:
        if self.planes is None:
            raise ValueError("nothing to render yet: run edit() first")
        self.render_count += 1
        return self.editor.render(self.planes, cameras)["image"]

    @staticmethod
    def camera(yaw_deg: float, pitch_deg: float) -> torch.Tensor:
        """1×25 camera at yaw/pitch degrees from frontal (the original 3DPE focal, radius 2.7)."""
        from utils.cameras import FOCAL_3DPE, look_at_cameras

        return look_at_cameras(math.pi / 2 + math.radians(yaw_deg), math.pi / 2 + math.radians(pitch_deg),
                               focal=FOCAL_3DPE).reshape(1, 25)

    def edit(self) -> tuple[list[Image.Image], str]:
        """Encode (once per portrait+prompt), render the views at `view_yaws_deg`, write the orbit video.

        Returns (views as RGB PIL images, path of the orbit mp4).
        """
        from utils.cameras import orbit_cameras
        from utils.image_io import tensor_to_uint8
        from utils.video import AtomicVideoWriter

        with self.lock:
            self._encode()
            cams = torch.cat([self.camera(y, 0.0) for y in self.view_yaws_deg])
            views = [Image.fromarray(tensor_to_uint8(v)) for v in self._render(cams)]
            self._orbit_count += 1
            path = self.work_dir / f"orbit_{self._orbit_count:04d}.mp4"
            orbit = orbit_cameras(self.orbit_frames)
            with AtomicVideoWriter(path, fps=self.orbit_fps) as writer:
                for i in range(0, orbit.shape[0], 8):
                    for f in self._render(orbit[i : i + 8]):
                        writer.append(tensor_to_uint8(f))
            return views, str(path)

    def rerender(self, yaw_deg: float, pitch_deg: float) -> Image.Image:
        """Render the cached triplane at yaw/pitch (degrees from frontal), without re-encoding."""
        from utils.image_io import tensor_to_uint8

        with self.lock:
            img = self._render(self.camera(float(yaw_deg), float(pitch_deg)))
            return Image.fromarray(tensor_to_uint8(img[0]))


# --------------------------------------------------------------------------------------------------
# Gradio app
# --------------------------------------------------------------------------------------------------


def build_app(session: DemoSession, examples: list[str] | None = None) -> Any:
    """The Gradio Blocks app around `session`. API endpoints: /align, /edit, /rerender."""
    gr = import_gradio()

    def on_align(image):
        if image is None:
            return None, "upload a portrait"
        aligned = session.set_portrait(image)
        return aligned, session.message

    def on_edit(image, reference, text, yaw, pitch):
        if image is not None:
            session.set_portrait(image)  # same image: nothing re-encoded
        if session.portrait is None:
            raise gr.Error("upload a portrait first")
        try:
            if session.editor.is_editing:
                session.set_prompt(reference=reference, text=text)
            views, video = session.edit()
            view = session.rerender(yaw, pitch)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return views, video, view, session.message

    def on_rerender(yaw, pitch):
        try:
            return session.rerender(yaw, pitch)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title="3DPE: 3D-aware portrait editing", analytics_enabled=False) as app:
        gr.Markdown("## 3DPE: 3D-aware portrait editing\nUpload a portrait (it is aligned to the EG3D crop), "
                    "give a reference image or a text, press **Edit**; the sliders re-render the edited 3D head.")
        with gr.Row():
            with gr.Column():
                portrait = gr.Image(label="portrait", type="pil")
                aligned = gr.Image(label="aligned", type="pil", interactive=False)
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[portrait])
            with gr.Column():
                reference = gr.Image(label="reference image (the edit)", type="pil")
                text = gr.Textbox(label="or a text prompt", placeholder="e.g. turn her into a bronze statue")
                run = gr.Button("Edit", variant="primary")
                status = gr.Markdown()
            with gr.Column():
                view = gr.Image(label="view", type="pil", interactive=False)
                yaw = gr.Slider(-45, 45, value=0, step=1, label="yaw (degrees)")
                pitch = gr.Slider(-30, 30, value=0, step=1, label="pitch (degrees)")
        with gr.Row():
            gallery = gr.Gallery(label="views", columns=len(session.view_yaws_deg))
            video = gr.Video(label="orbit")
        portrait.change(on_align, inputs=[portrait], outputs=[aligned, status], api_name="align")
        run.click(on_edit, inputs=[portrait, reference, text, yaw, pitch],
                  outputs=[gallery, video, view, status], api_name="edit")
        for s in (yaw, pitch):
            s.release(on_rerender, inputs=[yaw, pitch], outputs=[view], api_name="rerender" if s is yaw else False)
    return app


def launch(app: Any, port: int | None = None, share: bool = False, block: bool = True,
           allowed_paths: list[str] | None = None) -> Any:
    """Launch on 127.0.0.1 (public link only with share=True). block=False returns at once (tests).

    Gradio's own start-up lines are silenced (`quiet`: its hint "set `share=True` in `launch()`" names its Python
    API, not this command's flag); when blocking, `startup_lines` are printed instead, then it serves until the
    app is closed or Ctrl-C. Gradio still prints the public URL (or why there is none) with share=True.
    """
    result = app.launch(server_name="127.0.0.1", server_port=port, share=share, prevent_thread_lock=True,
                        quiet=True, allowed_paths=allowed_paths, inbrowser=False)
    if block:
        from utils.distributed import print_line

        for line in startup_lines(app.local_url, share):
            print_line(line)
        app.block_thread()
    return result


def startup_lines(local_url: str, share: bool) -> list[str]:
    """What the command prints once the app serves: where it is, and how to get a public link."""
    lines = [f"demo running on {local_url} (Ctrl-C to stop)"]
    if not share:
        lines.append("public link: none (pass --share for a temporary public Gradio link)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also create a public Gradio link (off by default)")
    p.add_argument("--orbit-frames", type=int, default=48)
    add_editor_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import_gradio()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from utils.errors import ThreeDPEError, report_user_error

    try:
        editor = EditorOptions.from_args(args).build(needs_text=True)  # the bridge loads on the first text edit, if any
    except ThreeDPEError as e:  # a missing checkpoint, a Hub id not cached offline: one line, no traceback
        return report_user_error(e)
    # The temporary folder goes when the app stops: launch returns when the app is closed or on Ctrl-C (Gradio
    # catches it), and the `with` also covers an exception or a Ctrl-C raised outside Gradio's loop.
    try:
        with DemoSession(editor, orbit_frames=args.orbit_frames) as session:
            examples = [str(p) for p in sorted(Path("test_imgs/input").glob("*.png"))]
            app = build_app(session, examples=examples or None)
            launch(app, port=args.port, share=args.share, block=True, allowed_paths=[str(session.work_dir)])
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
