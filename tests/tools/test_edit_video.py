"""tools.edit_video end to end on a short synthetic video (made here) with a tiny random editor."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.crop_tracking import CentredWindowSmoother, FrameTrack, smooth_window
from pipelines.editor import PortraitEditor
from pipelines.video_edit import CameraPlan
from tools import edit_video as ev
from utils.face_alignment import CropBox, MTCNNDetector
from utils.video import AtomicVideoWriter, iter_video_frames, read_video_meta

FPS = 10.0
SIDE = 128  # source frame size
NOISE_AT = 3  # index of the frame without a face
N_FRAMES = 7
CROP = 64  # encoder input side for the tiny model


def _astronaut_frames() -> list[np.ndarray]:
    """6 frames of the astronaut portrait panned 3 px per frame, with a noise frame at NOISE_AT."""
    from skimage import data

    img = Image.fromarray(data.astronaut())
    cx, cy, half = 225, 117, 139  # around the face (EG3D crop box ≈ (225, 117), side 154)
    frames = []
    for i in range(N_FRAMES - 1):
        dx = 3 * i
        box = (cx - half + dx, cy - half, cx + half + dx, cy + half)
        frames.append(np.asarray(img.crop(box).resize((SIDE, SIDE), Image.BICUBIC)))
    noise = (np.random.default_rng(0).random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    frames.insert(NOISE_AT, noise)
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "in.mp4"
    with AtomicVideoWriter(path, fps=FPS) as w:
        for f in _astronaut_frames():
            w.append(f)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray((np.random.default_rng(1).random((80, 80, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def editor() -> PortraitEditor:
    return PortraitEditor.random_init(tiny=True, seed=0, device="cpu")


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector(device="cpu")


def _cli(video: Path, reference: Path, out: Path, *extra: str) -> dict:
    return ev.run(["--video", str(video), "--ref", str(reference), "--out", str(out), "--random-init", "--tiny",
                    "--device", "cpu", "--input-size", str(CROP), "--batch-size", "2", "--no-progress", *extra])


def test_cli_end_to_end(video: Path, reference: Path, tmp_path: Path, capsys):
    out = tmp_path / "out.mp4"
    summary = _cli(video, reference, out)
    assert summary["ok"] is True
    assert summary["frames"] == N_FRAMES and summary["edited"] == N_FRAMES - 1 and summary["no_face"] == 1
    meta = read_video_meta(out)
    assert meta["nframes"] == N_FRAMES
    assert meta["fps"] == pytest.approx(FPS)
    assert meta["size"] == (64, 64)  # the tiny renderer's image side
    assert summary["size"] == [64, 64]
    for key in ("output_mean_abs_diff", "input_mean_abs_diff", "stability_ratio", "frames_per_second"):
        assert summary[key] is not None
    assert summary["input_mean_abs_diff"] > 0
    # the summary is printed as one JSON line
    import json

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["frames"] == N_FRAMES
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_side_by_side_and_modes(video: Path, reference: Path, tmp_path: Path):
    out = tmp_path / "sbs.mp4"
    summary = _cli(video, reference, out, "--side-by-side", "--camera", "orbit", "--orbit-frames", "4",
                   "--no-face", "pass")
    assert summary["ok"] and summary["no_face_mode"] == "pass" and summary["no_face"] == 1
    meta = read_video_meta(out)
    assert meta["size"] == (128, 64) and meta["nframes"] == N_FRAMES


def test_cli_user_errors(video: Path, tmp_path: Path):
    missing = ev.run(["--video", str(tmp_path / "nope.mp4"), "--ref", "x.png", "--out", str(tmp_path / "o.mp4"),
                       "--random-init", "--tiny", "--device", "cpu"])
    assert missing["ok"] is False and "not found" in missing["error"]
    no_prompt = ev.run(["--video", str(video), "--out", str(tmp_path / "o.mp4"), "--random-init", "--tiny",
                         "--device", "cpu", "--no-progress"])
    assert no_prompt["ok"] is False and "--ref" in no_prompt["error"]
    assert not (tmp_path / "o.mp4").exists()


def _frames_of(path: Path) -> list[np.ndarray]:
    return [f.astype(np.float32) for f in iter_video_frames(path)]


def test_no_face_hold_vs_pass(editor, detector, tmp_path: Path):
    """hold repeats the previous edited frame; pass writes the input framed by the last crop."""
    frames = _astronaut_frames()
    prompt = editor.encode_prompt(reference=torch.zeros(1, 3, CROP, CROP))
    outs = {}
    for mode in ("hold", "pass"):
        cfg = ev.VideoEditConfig(no_face=mode, batch_size=3, input_size=CROP, smooth_radius=2)
        s = ev.edit_video("synthetic", tmp_path / f"{mode}.mp4", editor, prompt, detector, cfg, progress=False,
                          frames=iter(frames), fps=FPS)
        assert (s.frames, s.edited, s.no_face) == (N_FRAMES, N_FRAMES - 1, 1)
        outs[mode] = _frames_of(tmp_path / f"{mode}.mp4")
    hold, passed = outs["hold"], outs["pass"]
    assert np.abs(hold[NOISE_AT] - hold[NOISE_AT - 1]).mean() < 3.0  # the same frame, up to compression
    assert np.abs(passed[NOISE_AT] - passed[NOISE_AT - 1]).mean() > 20.0  # the noise frame shows through
    for i in range(N_FRAMES):
        if i != NOISE_AT:  # edited frames do not depend on the no-face mode
            assert np.abs(hold[i] - passed[i]).mean() < 3.0


def test_prompt_computed_once_through_bridge(detector, tmp_path: Path):
    """A text prompt with a MAE checkpoint edits the first aligned face once and reuses the embedding."""
    calls = []

    def bridge(images, instructions):
        calls.append((tuple(images.shape), tuple(instructions)))
        return -images

    ed = PortraitEditor.random_init(tiny=True, seed=0, device="cpu", text_bridge=bridge)
    encodes = []
    original = ed.prompt

    def counting(*a, **k):
        encodes.append(k.get("text"))
        return original(*a, **k)

    ed.prompt = counting
    reference, text = ev.video_prompt(ed, None, "make it bronze", size=CROP)
    assert reference is None and text == "make it bronze" and not encodes  # nothing computed before the first face
    cfg = ev.VideoEditConfig(batch_size=2, input_size=CROP)
    s = ev.edit_video("synthetic", tmp_path / "t.mp4", ed, None, detector, cfg, progress=False,
                      frames=iter(_astronaut_frames()), fps=FPS, reference=reference, text=text)
    assert s.edited == N_FRAMES - 1
    assert calls == [((1, 3, CROP, CROP), ("make it bronze",))]
    assert encodes.count("make it bronze") == 1  # (the bridge then encodes its edit as a reference once)
    assert len(encodes) == 2


def test_failed_run_leaves_no_file(editor, detector, tmp_path: Path, monkeypatch):
    prompt = editor.encode_prompt(reference=torch.zeros(1, 3, CROP, CROP))
    n = {"edit": 0}
    original = editor.edit

    def failing(*a, **k):
        n["edit"] += 1
        if n["edit"] == 2:
            raise RuntimeError("killed")
        return original(*a, **k)

    monkeypatch.setattr(editor, "edit", failing)
    out = tmp_path / "killed.mp4"
    with pytest.raises(RuntimeError):
        ev.edit_video("synthetic", out, editor, prompt, detector, ev.VideoEditConfig(batch_size=2, input_size=CROP),
                      progress=False, frames=iter(_astronaut_frames()), fps=FPS)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


class _ListDetector:
    """Returns given landmarks per call (None: no face)."""

    def __init__(self, landmarks):
        self.landmarks = list(landmarks)

    def detect(self, image, key=None):
        from utils.face_alignment import Face

        lm = self.landmarks.pop(0)
        return [] if lm is None else [Face(None, 1.0, np.asarray(lm, dtype=np.float64))]


def test_smoother_streams_in_order_and_reduces_jitter():
    rng = np.random.default_rng(0)
    n, r = 40, 4
    boxes = [CropBox(100 + rng.normal(0, 3), 120 + rng.normal(0, 3), 80 * float(np.exp(rng.normal(0, 0.03))))
             for _ in range(n)]
    boxes[10] = None  # a frame without a face stays without one
    sm = CentredWindowSmoother(r)
    out = []
    for i, b in enumerate(boxes):
        got = sm.push(FrameTrack(i, np.zeros((1, 1, 3), np.uint8), b))
        assert len(sm._items) <= 2 * r + 1  # bounded buffer (streaming)
        out.extend(got)
        if i >= r:
            assert out[-1].index == i - r  # delayed by exactly r frames
    out.extend(sm.flush())
    assert [t.index for t in out] == list(range(n))
    assert out[10].box is None

    def jitter(seq):
        xs = np.array([b.center_x for b in seq if b is not None])
        return np.abs(np.diff(xs)).mean()

    assert jitter([t.box for t in out]) < 0.4 * jitter(boxes)


def test_smoother_ignores_scene_cut():
    boxes = [CropBox(100, 100, 80)] * 5 + [CropBox(400, 300, 150)] * 5
    tracks = [FrameTrack(i, np.zeros((1, 1, 3), np.uint8), b) for i, b in enumerate(boxes)]
    sm = [smooth_window(tracks, i, 3) for i in range(len(tracks))]
    assert (sm[4].box.center_x, sm[4].box.size) == pytest.approx((100, 80))
    assert (sm[5].box.center_x, sm[5].box.size) == pytest.approx((400, 150))


def test_camera_plans():
    track = FrameTrack(5, np.zeros((1, 1, 3), np.uint8), CropBox(0, 0, 1), pose=(0.2, -0.1))
    frontal = CameraPlan(ev.VideoEditConfig(camera="frontal"))(track)
    assert frontal.shape == (1, 25)
    assert frontal[0, 3].abs() < 1e-5 and frontal[0, 11] == pytest.approx(2.7 + 0.0, abs=0.01)  # at (0,0,2.7)
    fixed = CameraPlan(ev.VideoEditConfig(camera="fixed", yaw=20.0))(track)
    assert fixed[0, 3] > 0.5  # camera moved to +x
    frame = CameraPlan(ev.VideoEditConfig(camera="frame"))(track)
    assert frame[0, 3] > 0.3 and frame[0, 7] > 0.1  # yaw 0.2 rad → camera at +x; pitch −0.1 rad → above (world y up)
    orbit = CameraPlan(ev.VideoEditConfig(camera="orbit", orbit_frames=4))
    a, b = orbit(FrameTrack(1, track.frame)), orbit(FrameTrack(5, track.frame))
    assert torch.equal(a, b) and not torch.equal(a, orbit(FrameTrack(2, track.frame)))
    with pytest.raises(ValueError):
        ev.VideoEditConfig(camera="sideways").validate()


# --------------------------------------------------------------------------------------------------
# unreadable inputs: one line naming the file, no traceback, no ffmpeg dump (unless --verbose)
# --------------------------------------------------------------------------------------------------


def _bad_videos(root: Path, good: Path) -> dict[str, Path]:
    """Paths that are not usable videos: missing, a text file, truncated mp4 bytes, a folder."""
    text = root / "notes.mp4"
    text.write_text("this is not a video\n")
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # moov atom (at the end) cut off
    folder = root / "clips.mp4"
    folder.mkdir()
    return {"missing": root / "missing.mp4", "text": text, "truncated": truncated, "folder": folder}


BAD_KINDS = ("missing", "text", "truncated", "folder")
EXPECTED_PROBLEM = {"missing": "not found", "text": "cannot be opened as a video",
                    "truncated": "cannot be opened as a video", "folder": "is a folder"}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_bad_video_is_one_line(kind: str, video: Path, reference: Path, tmp_path: Path, capfd):
    bad = _bad_videos(tmp_path, video)[kind]
    out = tmp_path / "o.mp4"
    summary = _cli(bad, reference, out)
    captured = capfd.readouterr()
    assert summary["ok"] is False
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err_lines) == 1, captured.err
    assert str(bad) in err_lines[0] and EXPECTED_PROBLEM[kind] in err_lines[0]
    assert "Traceback" not in captured.err and "ffmpeg version" not in captured.err
    assert "ffmpeg version" not in captured.out
    assert not out.exists()


def test_cli_bad_video_verbose_shows_ffmpeg_details(video: Path, reference: Path, tmp_path: Path, capfd):
    bad = _bad_videos(tmp_path, video)["truncated"]
    summary = _cli(bad, reference, tmp_path / "o.mp4", "--verbose")
    err = capfd.readouterr().err
    assert summary["ok"] is False
    assert err.splitlines()[0].startswith(f"error: video '{bad}'")
    assert "ffmpeg version" in err and "moov atom not found" in err  # ffmpeg's own report
    assert "Traceback" not in err


def test_cli_bad_video_exit_code(video: Path, tmp_path: Path):
    """`python -m tools.edit_video` on a corrupt file: exit status 1, one line on stderr."""
    import subprocess
    import sys

    bad = _bad_videos(tmp_path, video)["text"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tools.edit_video", "--video", str(bad), "--ref", "x.png",
                           "--out", str(tmp_path / "o.mp4")], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr and "ffmpeg version" not in proc.stderr


def test_read_video_meta_and_frames_raise_one_line_error(video: Path, tmp_path: Path):
    from utils.video import BadVideoError

    for kind, bad in _bad_videos(tmp_path, video).items():
        for read in (read_video_meta, lambda p: next(iter_video_frames(p))):
            with pytest.raises(BadVideoError) as info:
                read(bad)
            assert "\n" not in str(info.value) and str(bad) in str(info.value)
            if kind in ("text", "truncated"):
                assert "ffmpeg" in info.value.details  # kept for --verbose
