"""Files written in one go appear atomically: a write that fails half-way (disk full, killed) leaves the previous file
untouched (or no file) and no temporary file behind. All of them go through utils/atomic.py."""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils import atomic

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


class _HalfThenDiskFull:
    """A file whose first write stores half the data, then fails like a full disk."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: max(1, len(data) // 2)])
        self._fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@contextlib.contextmanager
def disk_full_for(monkeypatch, match: str):
    """Any file opened for writing whose name contains `match` (directly, or a temporary named after it) fails
    half-way through its first write. Covers open(), Path.write_text/bytes (io.open) and os.fdopen (mkstemp)."""
    real_open, real_io_open, real_fdopen = builtins.open, io.open, os.fdopen

    def writing(mode) -> bool:
        return any(c in str(mode) for c in "wax+")

    def wrap_open(real):
        def opener(file, mode="r", *a, **k):
            fh = real(file, mode, *a, **k)
            name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
            return _HalfThenDiskFull(fh) if writing(mode) and match in os.path.basename(str(name)) else fh
        return opener

    def fdopen(fd, mode="r", *a, **k):
        name = os.readlink(f"/proc/self/fd/{fd}")
        fh = real_fdopen(fd, mode, *a, **k)
        return _HalfThenDiskFull(fh) if writing(mode) and match in os.path.basename(name) else fh

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", wrap_open(real_open))
        m.setattr(io, "open", wrap_open(real_io_open))
        m.setattr(os, "fdopen", fdopen)
        yield


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------ the helpers themselves
def test_helpers_leave_target_and_folder_clean_on_failure(tmp_path: Path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    with disk_full_for(monkeypatch, "a.txt"), pytest.raises(OSError):
        atomic.atomic_write_text(target, "new contents\n")
    assert target.read_text() == "old\n" and _names(tmp_path) == {"a.txt"}
    atomic.atomic_write_text(target, "new ☃\n")
    assert target.read_text(encoding="utf-8") == "new ☃\n"
    atomic.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_atomic_torch_save(tmp_path: Path, monkeypatch):
    path = tmp_path / "w.pt"
    atomic.atomic_torch_save({"x": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    with disk_full_for(monkeypatch, "w.pt"), pytest.raises((OSError, RuntimeError)):
        atomic.atomic_torch_save({"x": torch.zeros(1000)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3)) and _names(tmp_path) == {"w.pt"}


def test_atomic_directory(tmp_path: Path):
    dst = tmp_path / "ckpt"
    with atomic.atomic_directory(dst) as d:
        (d / "f").write_text("1")
    assert (dst / "f").read_text() == "1"
    with pytest.raises(RuntimeError), atomic.atomic_directory(dst) as d:
        (d / "f").write_text("2")
        raise RuntimeError("killed")
    assert (dst / "f").read_text() == "1" and _names(tmp_path) == {"ckpt"}
    with atomic.atomic_directory(dst) as d:
        (d / "g").write_text("3")
    assert _names(dst) == {"g"} and _names(tmp_path) == {"ckpt"}  # replaced, old folder removed


# ------------------------------------------------------------------ the project's writers
def test_prompt_txt_is_atomic(tmp_path: Path, monkeypatch):
    import test_scripts

    data = tmp_path / "imgs"
    (data / "input").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(data / "input" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_prompt.txt").write_text("the previous prompt\n")
    argv = ["--random-init", "--tiny", "--device", "cpu", "--prompt-encoder", "clip", "--data-dir", str(data),
            "--output-dir", str(out), "--prompt", "make him look like a golden statue"]
    with disk_full_for(monkeypatch, "_prompt.txt"), pytest.raises(OSError):
        test_scripts.main(argv)
    assert (out / "a_prompt.txt").read_text() == "the previous prompt\n"
    assert not [n for n in _names(out) if "prompt" in n and n != "a_prompt.txt"]  # no temporary left
    assert test_scripts.main(argv) == 0
    assert (out / "a_prompt.txt").read_text() == "make him look like a golden statue\n"


@pytest.mark.parametrize("name", ["metrics.json", "metrics.md"])
def test_metrics_files_are_atomic(name: str, tmp_path: Path, monkeypatch, capsys):
    from tools.evaluate import main

    data, res = tmp_path / "data", tmp_path / "res"
    (data / "input").mkdir(parents=True)
    res.mkdir()
    arr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(data / "input" / "a.png")
    for i in range(2):
        Image.fromarray(arr).save(res / f"a_view{i}.png")
    for n in ("metrics.json", "metrics.md"):
        (res / n).write_text(f"previous {n}\n")
    before = _names(res)
    argv = ["--results", str(res), "--data-dir", str(data), "--clip-weights", str(tmp_path / "x.bin"),
            "--id-weights", str(tmp_path / "x.pth"), "--lpips-dir", str(tmp_path), "--device", "cpu"]
    with disk_full_for(monkeypatch, name):
        rc = main(argv)
    assert rc != 0 and "No space left" in capsys.readouterr().err
    assert (res / name).read_text() == f"previous {name}\n"
    assert _names(res) == before
    assert main(argv) == 0
    assert json.loads((res / "metrics.json").read_text())["count"] == 1


def test_save_config_is_atomic(tmp_path: Path, monkeypatch):
    from dataclasses import dataclass

    from utils.config import load_config, save_config

    @dataclass
    class Cfg:
        lr: float = 0.1
        name: str = "x"

    path = tmp_path / "cfg.yaml"
    save_config(Cfg(), path)
    with disk_full_for(monkeypatch, "cfg.yaml"), pytest.raises(OSError):
        save_config(Cfg(lr=0.5, name="y" * 1000), path)
    assert load_config(Cfg, path) == Cfg() and _names(tmp_path) == {"cfg.yaml"}


def test_write_ply_is_atomic(tmp_path: Path, monkeypatch):
    from utils.mesh import read_ply, write_ply

    v, f = np.eye(3, dtype=np.float32), np.array([[0, 1, 2]], dtype=np.int32)
    write_ply(tmp_path / "m.ply", v, f)
    with disk_full_for(monkeypatch, "m.ply"), pytest.raises(OSError):
        write_ply(tmp_path / "m.ply", np.zeros((10, 3), np.float32), np.zeros((4, 3), np.int32))
    v2, f2 = read_ply(tmp_path / "m.ply")
    assert np.array_equal(v2, v) and np.array_equal(f2, f) and _names(tmp_path) == {"m.ply"}


def test_tokenizer_files_are_atomic(tmp_path: Path, monkeypatch):
    from pipelines.instruct_pix2pix import clip_bpe_tokenizer_files

    vocab, merges = clip_bpe_tokenizer_files(tmp_path)
    good = vocab.read_bytes(), merges.read_bytes()
    for name in ("vocab.json", "merges.txt"):
        with disk_full_for(monkeypatch, name), pytest.raises(OSError):
            clip_bpe_tokenizer_files(tmp_path)
        assert (vocab.read_bytes(), merges.read_bytes()) == good and _names(tmp_path) == {"vocab.json", "merges.txt"}


def test_checkpoint_writers_are_atomic(tmp_path: Path, monkeypatch):
    """torch.save-based exports and the project-format folder: a failure leaves the old file/folder, no temporary."""
    import safetensors.torch

    from models import checkpoint as ck
    from models.eg3d.config import RendererConfig

    def torch_save_dies(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"partial")
        else:
            Path(f).write_bytes(b"partial")
        raise RuntimeError("killed while saving")

    writers = {
        "eg3d.pth": lambda p, x: ck.write_eg3d_pth(p, {"w": x}),
        "3dpe.pt": lambda p, x: ck.export_original_3dpe(p, {"Final_encoder.w": x}, {"r": x}),
    }
    for name, write in writers.items():
        path = write(tmp_path / name, torch.ones(2))
        old = path.read_bytes()
        with monkeypatch.context() as m:
            m.setattr(torch, "save", torch_save_dies)
            with pytest.raises(RuntimeError):
                write(tmp_path / name, torch.zeros(2))
        assert path.read_bytes() == old
    assert _names(tmp_path) == set(writers)

    dst = ck.save_pretrained(tmp_path / "proj", {"renderer": {"a": torch.ones(1)}}, "live3d",
                             {"renderer": RendererConfig.tiny()}, {"note": "first"})
    with monkeypatch.context() as m:
        def save_file_dies(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise RuntimeError("killed while saving")

        m.setattr(safetensors.torch, "save_file", save_file_dies)
        with pytest.raises(RuntimeError):
            ck.save_pretrained(dst, {"renderer": {"a": torch.zeros(1)}}, "live3d",
                               {"renderer": RendererConfig.tiny()}, {"note": "second"})
    assert json.loads((dst / "config.json").read_text())["source"]["note"] == "first"
    assert _names(tmp_path) == set(writers) | {"proj"}


def test_eg3d_sample_tensors_are_atomic(tmp_path: Path, monkeypatch):
    from tools.eg3d_samples import save_seed

    def result(v: float) -> dict[str, torch.Tensor]:
        return {"planes": torch.full((1, 96, 4, 4), v), "image": torch.full((1, 3, 8, 8), v),
                "image_raw": torch.full((1, 3, 4, 4), v), "image_depth": torch.full((1, 1, 4, 4), v)}

    save_seed(tmp_path, 3, result(0.5), save_tensors=True)
    old = (tmp_path / "seed0003.safetensors").read_bytes()
    with disk_full_for(monkeypatch, "seed0003.safetensors"), pytest.raises(OSError):
        save_seed(tmp_path, 3, result(-0.5), save_tensors=True)
    assert (tmp_path / "seed0003.safetensors").read_bytes() == old
    assert _names(tmp_path) == {"seed0003.png", "seed0003.safetensors"}


def test_training_checkpoint_folders_are_atomic(tmp_path: Path):
    """A save that dies leaves no step folder and no temporary; what a killed run left goes at the next save."""
    from training.state import latest_checkpoint, save_checkpoint

    def snapshot(dst: Path) -> None:
        dst.mkdir()
        (dst / "config.json").write_text("{}")

    def dies(dst: Path) -> None:
        snapshot(dst)
        raise RuntimeError("killed while saving")

    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"step": 1}, snapshot)
    with pytest.raises(RuntimeError):
        save_checkpoint(root, 2, {"step": 2}, dies)
    assert _names(root) == {"step_00000001"} and latest_checkpoint(root) == root / "step_00000001"
    (root / ".step_00000002.x1y2.tmp").mkdir()  # a SIGKILL leaves its temporary folder
    (root / ".step_00000002.x1y2.tmp" / "training_state.pt").write_bytes(b"half")
    assert latest_checkpoint(root) == root / "step_00000001"
    save_checkpoint(root, 2, {"step": 2}, snapshot, keep_last=3)
    assert _names(root) == {"step_00000001", "step_00000002"}
    assert _names(root / "step_00000002") == {"config.json", "training_state.pt"}
    save_checkpoint(root, 2, {"step": 22}, snapshot)  # the same step again replaces it
    assert torch.load(root / "step_00000002" / "training_state.pt")["step"] == 22
    assert _names(root) == {"step_00000001", "step_00000002"}
