"""tools.demo: DemoSession (align, encode once, re-render on slider change) and a headless app launch."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.editor import PortraitEditor
from tools import demo
from utils.face_alignment import MTCNNDetector
from utils.video import read_video_meta

CROP = 64


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def _noise(seed: int, size=(90, 70)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


class _Spy:
    """Counts calls to the editor's edit and render and records the render cameras."""

    def __init__(self, editor: PortraitEditor):
        self.edits, self.cameras = 0, []
        self._edit, self._render = editor.edit, editor.render
        editor.edit, editor.render = self.edit, self.render

    def edit(self, *a, **k):
        self.edits += 1
        return self._edit(*a, **k)

    def render(self, planes, cameras, *a, **k):
        self.cameras.append(cameras.clone())
        return self._render(planes, cameras, *a, **k)


@pytest.fixture()
def session(tmp_path) -> tuple[demo.DemoSession, _Spy]:
    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    spy = _Spy(editor)
    s = demo.DemoSession(editor, detector=MTCNNDetector(device="cpu"), orbit_frames=4, orbit_fps=8,
                         work_dir=tmp_path / "demo", input_size=CROP)
    return s, spy


def test_set_portrait_aligns_or_centre_crops(session, astronaut):
    s, _ = session
    aligned = s.set_portrait(astronaut)
    assert aligned.size == (CROP, CROP) and "face found" in s.message
    assert s.portrait.shape == (1, 3, CROP, CROP) and s.portrait.min() >= -1 and s.portrait.max() <= 1
    fallback = s.set_portrait(_noise(0))
    assert fallback.size == (CROP, CROP) and "no face" in s.message and "centre crop" in s.message


def test_edit_encodes_once_and_sliders_only_render(session, astronaut):
    s, spy = session
    with pytest.raises(ValueError):
        s.rerender(0, 0)  # nothing encoded yet
    s.set_portrait(astronaut)
    with pytest.raises(ValueError):
        s.edit()  # an editing checkpoint needs a prompt
    s.set_prompt(reference=_noise(1))
    views, video = s.edit()
    assert len(views) == 3 and all(v.size == (64, 64) for v in views)
    meta = read_video_meta(video)
    assert meta["nframes"] == 4 and meta["size"] == (64, 64)
    assert (s.encode_count, spy.edits) == (1, 1)

    for yaw, pitch in [(10, 0), (-20, 5), (30, -10)]:
        img = s.rerender(yaw, pitch)
        assert img.size == (64, 64)
        assert torch.allclose(spy.cameras[-1], demo.DemoSession.camera(yaw, pitch))
    assert (s.encode_count, spy.edits) == (1, 1)  # slider changes never re-encode
    assert s.render_count == 2 + 3  # views + orbit (one chunk), then 3 re-renders

    s.edit()  # same portrait and prompt: cached triplane
    s.set_prompt(reference=_noise(1))  # the same prompt again: still cached
    s.set_portrait(astronaut)
    s.edit()
    assert spy.edits == 1
    s.set_prompt(text=None, reference=_noise(2))  # a new prompt: encoded again
    s.edit()
    assert spy.edits == 2


def test_text_prompt_goes_through_bridge(tmp_path, astronaut):
    calls = []

    def bridge(images, instructions):
        calls.append(list(instructions))
        return images.flip(-1)

    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu", text_bridge=bridge)
    s = demo.DemoSession(editor, detector=MTCNNDetector(device="cpu"), orbit_frames=2, work_dir=tmp_path,
                         input_size=CROP)
    s.set_portrait(astronaut)
    s.set_prompt(text="  make it gold ")
    s.edit()
    s.rerender(5, 5)
    assert calls == [["make it gold"]] and s.prompt_reference is not None


def test_missing_gradio_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(ImportError, match="pip install gradio"):
        demo.import_gradio()
    assert demo.main(["--random-init", "--tiny", "--device", "cpu"]) == 2
    assert "pip install gradio" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_app_launches_headless_and_answers(session, astronaut):
    pytest.importorskip("gradio", reason="gradio is optional (pip install gradio)")
    client_mod = pytest.importorskip("gradio_client")
    s, spy = session
    s.set_portrait(astronaut)
    s.set_prompt(reference=_noise(1))
    s.edit()
    app = demo.build_app(s)
    port = _free_port()
    try:
        _, url, _ = demo.launch(app, port=port, block=False, allowed_paths=[str(s.work_dir)])
        assert url.startswith("http://127.0.0.1:")
        client = client_mod.Client(url, verbose=False)
        result = client.predict(12, -4, api_name="/rerender")
        img = Image.open(result if isinstance(result, str) else result["path"])
        assert img.size == (64, 64)
        assert torch.allclose(spy.cameras[-1], demo.DemoSession.camera(12, -4))
        assert spy.edits == 1  # the request only rendered
    finally:
        app.close()


# ------------------------------------------------------------------ the temporary folder goes when the demo stops
def test_session_temp_dir_removed_on_close(astronaut):
    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    with demo.DemoSession(editor, detector=MTCNNDetector(device="cpu"), orbit_frames=2, input_size=CROP) as s:
        s.set_portrait(astronaut)
        s.set_prompt(reference=_noise(1))
        _, video = s.edit()
        work = s.work_dir
        assert Path(video).parent == work and Path(video).is_file()
    assert not work.exists()
    s.close()  # idempotent


def test_given_work_dir_is_kept(tmp_path):
    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    demo.DemoSession(editor, work_dir=tmp_path / "mine").close()
    assert (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("stop", ["returns", "ctrl_c"])
def test_main_removes_temp_dir_when_it_stops(monkeypatch, stop):
    """launch returns (the app was closed, or Gradio caught Ctrl-C) or raises KeyboardInterrupt: the folder goes."""
    pytest.importorskip("gradio", reason="gradio is optional (pip install gradio)")
    seen = []

    def fake_launch(app, port=None, share=False, block=True, allowed_paths=None):
        work = Path(allowed_paths[0])
        seen.append((work, work.is_dir()))
        if stop == "ctrl_c":
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "launch", fake_launch)
    try:
        rc = demo.main(["--random-init", "--tiny", "--device", "cpu"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main (a traceback for the user, and pytest would stop here)")
    assert rc == (0 if stop == "returns" else 130)
    (work, existed), = seen
    assert existed and work.name.startswith("threedpe_demo_")
    assert not work.exists()


def test_main_removes_temp_dir_when_app_is_closed(monkeypatch, capfd):
    """A real blocking launch; closing the app (from another thread) ends main and removes the folder. What it
    printed names our --share flag, not Gradio's `launch(share=True)`."""
    pytest.importorskip("gradio", reason="gradio is optional (pip install gradio)")
    import threading

    real_launch = demo.launch
    seen = []

    def launch_then_close(app, port=None, share=False, block=True, allowed_paths=None):
        seen.append(Path(allowed_paths[0]))
        block_thread = app.block_thread

        def close_once_serving():  # launch is done and blocks: the user closes the app from elsewhere
            threading.Thread(target=app.close, daemon=True).start()
            block_thread()

        app.block_thread = close_once_serving
        return real_launch(app, port=port, share=share, block=block, allowed_paths=allowed_paths)

    monkeypatch.setattr(demo, "launch", launch_then_close)
    port = _free_port()
    assert demo.main(["--random-init", "--tiny", "--device", "cpu", "--port", str(port)]) == 0
    assert seen and not seen[0].exists()
    out = capfd.readouterr()
    lines = out.out.splitlines()
    assert f"demo running on http://127.0.0.1:{port}/ (Ctrl-C to stop)" in lines, out.out
    assert "public link: none (pass --share for a temporary public Gradio link)" in lines
    assert "share=True" not in out.out + out.err
