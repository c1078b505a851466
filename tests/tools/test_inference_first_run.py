"""What a new user meets first with test_scripts.py: argument errors before any model loads, a missing
InstructPix2Pix reported once, references without a face under --align, status lines, meshes of any model,
output permissions. Tiny random models throughout."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_scripts
from pipelines.editor import PortraitEditor

ROOT = Path(test_scripts.__file__).resolve().parent


def _portrait(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "input").mkdir(parents=True)
    (d / "ref").mkdir()
    for i, stem in enumerate(("alice", "bob")):
        _portrait(i).save(d / "input" / f"{stem}.png")
        _portrait(i + 2).save(d / "ref" / f"{stem}.png")
    return d


def _run(args: list[str]) -> int:
    return test_scripts.main(["--random-init", "--tiny", "--device", "cpu", *args])


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if a model is built or loaded."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(PortraitEditor, "random_init", classmethod(refuse))
    monkeypatch.setattr(PortraitEditor, "from_pretrained", classmethod(refuse))


# ------------------------------------------------------------------ 3. arguments checked before loading
@pytest.mark.parametrize("case", ["missing_ref", "unreadable_ref", "ref_is_folder", "missing_prompts_file",
                                  "missing_input_folder"])
def test_bad_arguments_fail_in_one_line_before_any_model_loads(case, data_dir, tmp_path, capsys, no_model_loads):
    bad = tmp_path / "nope.png"
    extra = {"missing_ref": ["--ref", str(bad)], "ref_is_folder": ["--ref", str(tmp_path)],
             "missing_prompts_file": ["--prompts-file", str(tmp_path / "prompts.txt")],
             "missing_input_folder": ["--data-dir", str(tmp_path / "elsewhere")]}
    if case == "unreadable_ref":
        bad.write_bytes(b"not an image")
        extra[case] = ["--ref", str(bad)]
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"), *extra[case]])
    err = _lines(capsys.readouterr().err)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    named = {"missing_ref": str(bad), "unreadable_ref": str(bad), "ref_is_folder": str(tmp_path),
             "missing_prompts_file": str(tmp_path / "prompts.txt"),
             "missing_input_folder": str(tmp_path / "elsewhere" / "input")}[case]
    assert named in err[0]
    flag = {"missing_input_folder": "--data-dir", "missing_prompts_file": "--prompts-file"}.get(case, "--ref")
    assert flag in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------ 1. InstructPix2Pix missing: one line, once
def _no_ip2p_anywhere(monkeypatch, tmp_path: Path) -> None:
    """No pretrained_models/instruct-pix2pix (the working folder is elsewhere) and an empty Hub cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.chdir(tmp_path)


def _assert_ip2p_error(line: str) -> None:
    assert line.startswith("error: ")
    assert "'pretrained_models/instruct-pix2pix'" in line
    assert "`hf download timbrooks/instruct-pix2pix --local-dir pretrained_models/instruct-pix2pix`" in line
    assert "--ip2p-model PATH" in line and "huggingface" + "-cli" not in line


def test_text_prompt_without_instruct_pix2pix_fails_once_before_loading(data_dir, tmp_path, monkeypatch, capsys,
                                                                       no_model_loads):
    _no_ip2p_anywhere(monkeypatch, tmp_path)
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"), "--prompt", "make it bronze"])
    err = _lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1, err
    _assert_ip2p_error(err[0])


def test_text_prompt_with_a_mae_checkpoint_checks_instruct_pix2pix_once(data_dir, tmp_path, monkeypatch, capsys,
                                                                       tiny_original_architectures):
    """A checkpoint's prompt encoder is known only once it is loaded: the check comes then, before any input."""
    import torch

    import pipelines.instruct_pix2pix as ip2p
    from models.checkpoint import export_original_3dpe
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(0)
    ckpt = tmp_path / "3dpe.pt"
    export_original_3dpe(ckpt, EditingEncoder(EditingEncoderConfig.tiny()).state_dict(),
                         TriplaneRenderer(RendererConfig.tiny()).state_dict())
    loads = []
    monkeypatch.setattr(ip2p, "InstructPix2PixEditor", lambda *a, **k: loads.append(a))
    _no_ip2p_anywhere(monkeypatch, tmp_path)
    rc = test_scripts.main(["--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--device", "cpu",
                            "--output-dir", str(tmp_path / "out"), "--prompt", "make it bronze"])
    err = _lines(capsys.readouterr().err)
    assert rc == 2 and loads == []
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    _assert_ip2p_error(errors[0])
    assert not any("alice" in ln or "bob" in ln for ln in err)  # no input was tried


def test_no_huggingface_cli_left_in_the_repository():
    """`huggingface_hub` installs `hf`; its old name (`word`) must not be suggested anywhere."""
    word = "huggingface" + "-cli"
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".txt", ".yaml", ".toml"} and p.is_file()
             and not any(part.startswith(".") or part == "site-packages" for part in p.relative_to(ROOT).parts)]
    hits = [str(p.relative_to(ROOT)) for p in files if word in p.read_text(errors="ignore")]
    assert hits == []


# ------------------------------------------------------------------ 2. --align with references without a face
class _FakeDetector:
    """Finds a face in every image except references (and inputs named 'noface')."""

    def __init__(self, *a, **k):
        pass

    def detect(self, image, key=None):
        from utils.face_alignment import EMPIRICAL_LANDMARKS_512, Face

        if key is None or "/ref/" in key.replace(os.sep, "/") or "sketch" in key or "noface" in key:
            return []
        return [Face(None, 0.99, EMPIRICAL_LANDMARKS_512 * image.width / 512)]


def test_align_uses_a_reference_without_a_face_as_it_is(data_dir, tmp_path, monkeypatch, capsys):
    import utils.face_alignment

    monkeypatch.setattr(utils.face_alignment, "MTCNNDetector", _FakeDetector)
    sketch = tmp_path / "sketch.png"
    _portrait(9, size=80).save(sketch)
    _portrait(5).save(data_dir / "input" / "noface.png")
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"), "--align", "--ref", str(sketch)])
    err = capsys.readouterr().err
    assert rc == 1  # noface.png: an input without a face still fails, by name
    notes = [ln for ln in _lines(err) if ln.startswith("note: reference")]
    assert len(notes) == 1 and notes[0].startswith(f"note: reference {sketch} holds no face: used as it is "
                                                   "(resized to ") and notes[0].endswith("), not aligned"), notes
    assert (tmp_path / "out" / "alice_mv.png").is_file() and (tmp_path / "out" / "bob_mv.png").is_file()
    assert "noface.png" in err and "no face found" in err
    # per-input references: one line for each reference, however many inputs
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out2"), "--align"])
    notes = [ln for ln in _lines(capsys.readouterr().err) if ln.startswith("note: reference")]
    assert sorted(ln.split(" holds no face")[0] for ln in notes) == [
        f"note: reference {data_dir / 'ref' / s}.png" for s in ("alice", "bob")]


# ------------------------------------------------------------------ 4, 5, 6. status, mesh, permissions
def test_status_lines_mesh_level_and_file_modes(data_dir, tmp_path, capsys):
    (data_dir / "input" / "bob.png").unlink()  # one input, stderr not a terminal: the phases come as lines
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        rc = _run(["--data-dir", str(data_dir), "--output-dir", str(out), "--save-triplane", "--mesh",
                   "--mesh-resolution", "24"])
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert rc == 0
    lines = _lines(err)
    assert lines[0].startswith("WARNING: --random-init") and "flat colour" in lines[0]
    for want in ("models loaded: random weights (tiny 3DPE editor) on cpu, ",
                 "alice: reading", "alice: encoding the reference", "alice: encoding the edited triplane",
                 "alice: rendering 3 views", "alice: writing files", "alice: meshing (density on a 24³ grid)"):
        assert any(ln.startswith(want) for ln in lines), (want, lines)
    assert "density grid 24³" in err  # the bar over the chunks of the grid
    # a random model's density never reaches EG3D's level 10: meshed at Otsu's threshold, with a note
    note = [ln for ln in lines if ln.startswith("note: alice: density")]
    assert len(note) == 1 and "Otsu" in note[0] and "--mesh-level" in note[0]
    from utils.mesh import read_ply

    verts, faces = read_ply(out / "alice.ply")
    assert len(verts) > 0 and len(faces) > 0
    # every output, the triplane too, gets 0666 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["alice_triplane.safetensors"] == 0o640, modes
    assert set(modes.values()) == {0o640}, modes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_mesh_level_that_is_never_crossed_says_how_to_choose(data_dir, tmp_path, capsys):
    (data_dir / "input" / "bob.png").unlink()
    out = tmp_path / "out"
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(out), "--mesh", "--mesh-resolution", "16",
               "--mesh-level", "1000"])
    warn = [ln for ln in _lines(capsys.readouterr().err) if ln.startswith("warning: alice: no mesh")]
    assert rc == 0 and not (out / "alice.ply").exists()
    assert len(warn) == 1 and "never crosses level 1000" in warn[0] and "Otsu" in warn[0]
    assert "--mesh-level" in warn[0]


def test_choose_level_keeps_eg3d_level_when_crossed_else_otsu():
    from utils.mesh import DEFAULT_LEVEL, choose_level, marching_cubes

    lin = np.linspace(-0.5, 0.5, 32)
    x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    trained = np.where(r < 0.3, 50.0, -5.0).astype(np.float32)  # a trained model: crosses 10 at its surface
    assert choose_level(trained, None, border=2) == (DEFAULT_LEVEL, None)
    weak = (1.0 - r).astype(np.float32)  # a model whose density never reaches 10
    level, note = choose_level(weak, None, border=2)
    inner = weak[2:-2, 2:-2, 2:-2]
    assert inner.min() < level < inner.max() and "Otsu" in note and "never crosses the default level 10" in note
    verts, faces = marching_cubes(weak, level, border=2)
    radius = np.linalg.norm(verts, axis=1)
    # the surface is the sphere r = 1 - level
    assert len(faces) > 0 and radius.std() < 0.02 and abs(radius.mean() - (1 - level)) < 0.02
    assert choose_level(weak, 3.0, border=2) == (3.0, None)  # a level given is kept
    with pytest.raises(ValueError, match=r"never crosses level 3 \(range .*Otsu"):
        marching_cubes(weak, 3.0, border=2)


def test_loading_line_is_erased_on_a_terminal_so_an_error_stays_alone(monkeypatch):
    import io
    import sys

    from tools.inference import _Status

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with pytest.raises(RuntimeError):
        with _Status(enabled=True).loading("3dpe.pt on cpu"):
            raise RuntimeError("no such checkpoint")
    assert term.getvalue() == "loading the models: 3dpe.pt on cpu ...\r\033[K"  # nothing left on the screen
    with _Status(enabled=True).loading("3dpe.pt on cpu"):
        pass
    second = term.getvalue()[len("loading the models: 3dpe.pt on cpu ...\r\033[K"):]
    assert second.startswith("loading the models: 3dpe.pt on cpu ...\r\033[Kmodels loaded: 3dpe.pt on cpu, ")
    assert second.endswith(" s\n") and second.count("\n") == 1


def test_usage_names_the_command_typed(monkeypatch, capsys):
    """`python -m tools.inference --help` says so; through test_scripts.py it says `test_scripts.py`."""
    import sys

    from tools.inference import parse_args

    for argv0, prog in (("/repo/tools/inference.py", "python -m tools.inference"), ("test_scripts.py", "test_scripts.py")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit) as e:
            parse_args(["--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {prog} "), argv0
