"""`customize`: a handful of tiny pairs (or inputs + an instruction) → a loadable project-format checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CUSTOMIZE = ROOT / "configs" / "customize.yaml"
CUSTOMIZE_TINY = ROOT / "configs" / "customize_tiny.yaml"
TINY_OVERRIDES = [
    "train.model.tiny=true", "train.model.init_checkpoint=", "train.data.resolution=64", "train.data.workers=0",
    "train.device=cpu", "train.max_steps=2", "train.log.save_interval=2", "train.log.tqdm=false",
    "train.log.image_size=32",
]


def _pairs(root: Path, n: int = 4, with_edits: bool = True, res: int = 64) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (res, res, 3), dtype=np.uint8)
        (root / "input").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "input" / f"p{i}.png")
        if with_edits:
            (root / "edited").mkdir(parents=True, exist_ok=True)
            Image.fromarray((255 - img).astype(np.uint8)).save(root / "edited" / f"p{i}.png")
    return root


def _tiny_base(root: Path, prompt_encoder: str = "mae") -> Path:
    """A tiny 'trained' 3DPE model in the project format (encoder, renderer, discriminator)."""
    from models.checkpoint import save_pretrained
    from models.discriminator import DiscriminatorConfig, EditingDualDiscriminator
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(1)
    e_cfg, r_cfg = EditingEncoderConfig.tiny(prompt_encoder), RendererConfig.tiny()
    d_cfg = DiscriminatorConfig.tiny(64)
    comps = {"encoder": EditingEncoder(e_cfg).state_dict(), "renderer": TriplaneRenderer(r_cfg).state_dict(),
             "discriminator": EditingDualDiscriminator(d_cfg).state_dict()}
    return save_pretrained(root / "base", comps, "3dpe", {"encoder": e_cfg, "renderer": r_cfg, "discriminator": d_cfg},
                           {"test": True})


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    return _tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def clip_base_checkpoint(tmp_path_factory) -> Path:
    return _tiny_base(tmp_path_factory.mktemp("clip_base"), "clip")


def test_pairs_reader_labels_and_references(tmp_path):
    from training.customize import CustomPairs
    from utils.cameras import FOCAL_EG3D_LABEL, frontal_camera

    root = _pairs(tmp_path / "pairs", n=3)
    label = [float(i) for i in range(25)]
    (root / "dataset.json").write_text(json.dumps({"labels": [["input/p1.png", label]]}))
    (root / "input" / "extra.png").write_bytes((root / "input" / "p0.png").read_bytes())  # no edit: skipped
    ds = CustomPairs(root / "input", root / "edited", 64, root / "dataset.json")
    assert ds.stems == ["p0", "p1", "p2"]
    assert torch.equal(ds[1]["camera"], torch.tensor(label))
    assert torch.allclose(ds[0]["camera"], frontal_camera(FOCAL_EG3D_LABEL)[0])
    assert ds[0]["camera"][0].item() == pytest.approx(1.0) and ds[0]["camera"][16].item() == pytest.approx(4.2647)
    for i in range(3):  # the reference is another pair's edit
        item = ds[i]
        assert not torch.equal(item["reference"], item["target"])
        assert item["input"].shape == (3, 64, 64) and item["input"].min() >= -1 and item["input"].max() <= 1


def test_customize_cli_writes_a_loadable_checkpoint(tmp_path, base_checkpoint):
    from models.checkpoint import build_models, load_checkpoint

    pairs = _pairs(tmp_path / "pairs")
    exp = tmp_path / "exps"
    cmd = [sys.executable, str(ROOT / "train_scripts.py"), "customize", "--config", str(CUSTOMIZE),
           "--pairs", str(pairs), "--base", str(base_checkpoint), "--name", "mystyle",
           *TINY_OVERRIDES, f"train.exp_dir={exp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = exp / "mystyle" / "final"
    ckpt = load_checkpoint(out)
    models = build_models(ckpt)
    base = load_checkpoint(base_checkpoint).components["encoder"]
    new = models["encoder"].state_dict()
    assert any(not torch.equal(new[k], base[k]) for k in base if k.startswith("Final_encoder."))
    assert all(torch.equal(new[k], base[k]) for k in base if k.startswith(("encoder.", "F_encoder.", "EHigh_encoder.")))
    from pipelines.editor import PortraitEditor

    editor = PortraitEditor.from_pretrained(out, device="cpu")
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert editor.edit(img, editor.encode_prompt(reference=img)).shape == (1, 96, 32, 32)


def test_customize_with_an_instruction(tmp_path, base_checkpoint):
    from pipelines.instruct_pix2pix import InstructPix2PixConfig, InstructPix2PixEditor, build_tiny_instruct_pix2pix
    from training.customize import run

    pairs = _pairs(tmp_path / "pairs", n=2, with_edits=False)
    ip2p = InstructPix2PixEditor.from_pipeline(build_tiny_instruct_pix2pix(),
                                               InstructPix2PixConfig(steps=2, resolution=64))
    res = run(str(CUSTOMIZE), [*TINY_OVERRIDES, f"train.exp_dir={tmp_path / 'exps'}", "train.max_steps=1"],
              pairs=str(pairs), base=str(base_checkpoint), instruction="make it bronze", name="bronze", editor=ip2p)
    edited = sorted(p.name for p in (res.run_dir / "edited").iterdir())
    assert edited == ["p0.png", "p1.png"]
    assert (res.run_dir / "final" / "model.safetensors").is_file()
    assert (res.run_dir / "instruction.txt").read_text().strip() == "make it bronze"


def test_customize_needs_pairs(tmp_path):
    from training.customize import CustomizeConfig, main
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="--pairs"):
        main(CustomizeConfig())
    _pairs(tmp_path, n=1, with_edits=False)
    with pytest.raises(ConfigError, match="edited"):
        main(CustomizeConfig(pairs=str(tmp_path)))


# ---------------------------------------------------------------------------------- `train_scripts.py customize`
def _cli(argv: list[str], capsys, config: Path = CUSTOMIZE) -> tuple[int, str]:
    """Run `train_scripts.py customize --config CONFIG ...` in-process; (exit code, stderr)."""
    rc, _, err = _cli_out(argv, capsys, config)
    return rc, err


def _cli_out(argv: list[str], capsys, config: Path = CUSTOMIZE) -> tuple[int, str, str]:
    """Run `train_scripts.py customize --config CONFIG ...` in-process; (exit code, stdout, stderr)."""
    sys.path.insert(0, str(ROOT))
    import train_scripts

    capsys.readouterr()
    rc = train_scripts.main(["customize", "--config", str(config), *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_customize_missing_input_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "pairs").mkdir()
    rc, err = _cli(["--pairs", str(tmp_path / "pairs"), *TINY_OVERRIDES], capsys)
    line = _error_line(err)
    assert rc == 2 and str(tmp_path / "pairs" / "input") in line and "does not exist" in line
    rc, err = _cli(["--pairs", str(tmp_path / "nowhere"), *TINY_OVERRIDES], capsys)
    assert rc == 2 and str(tmp_path / "nowhere") in _error_line(err)


def test_customize_empty_folders_are_one_line(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    (pairs / "input").mkdir(parents=True)
    (pairs / "edited").mkdir()
    rc, err = _cli(["--pairs", str(pairs), *TINY_OVERRIDES], capsys)
    line = _error_line(err)
    assert rc == 2 and f"'{pairs / 'input'}' holds no image" in line
    _pairs(pairs, n=2, with_edits=False)
    rc, err = _cli(["--pairs", str(pairs), *TINY_OVERRIDES], capsys)
    line = _error_line(err)
    assert rc == 2 and f"'{pairs / 'edited'}' holds no image" in line and "<stem>" in line


def test_customize_no_matching_stems_is_one_line(tmp_path, capsys):
    pairs = _pairs(tmp_path / "pairs", n=2)
    for p in (pairs / "edited").iterdir():
        p.rename(p.with_name("x" + p.name))
    rc, err = _cli(["--pairs", str(pairs), *TINY_OVERRIDES], capsys)
    line = _error_line(err)
    assert rc == 2 and str(pairs / "input") in line and str(pairs / "edited") in line and "same stem" in line


def test_customize_missing_base_names_the_option(tmp_path, capsys):
    pairs = _pairs(tmp_path / "pairs", n=1)
    missing = tmp_path / "nowhere" / "3dpe.pt"
    rc, err = _cli(["--pairs", str(pairs), "--base", str(missing), *TINY_OVERRIDES], capsys)
    line = _error_line(err)
    assert rc == 2 and f"'{missing}' does not exist" in line
    assert "--base PATH" in line and "base=PATH" in line  # the flag, and the config key for an override


def test_tiny_config_customizes_a_tiny_base_on_cpu(tmp_path, capsys, base_checkpoint):
    """configs/customize_tiny.yaml as shipped (only the run folder moved): `--pairs DIR --base CKPT` runs on CPU
    and says where the model is."""
    from pipelines.editor import PortraitEditor

    pairs = _pairs(tmp_path / "pairs", n=2)
    rc, out, err = _cli_out(["--pairs", str(pairs), "--base", str(base_checkpoint),
                             f"train.exp_dir={tmp_path / 'exps'}"], capsys, CUSTOMIZE_TINY)
    assert rc == 0, err
    final = tmp_path / "exps" / "custom_tiny" / "final"
    assert f"customized model: {final}/ (python test_scripts.py --checkpoint {final})" in out.splitlines()
    editor = PortraitEditor.from_pretrained(final, device="cpu")
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert editor.edit(img, editor.encode_prompt(reference=img)).shape == (1, 96, 32, 32)


def test_customize_skips_unmatched_inputs_with_one_warning(tmp_path, capsys, base_checkpoint):
    pairs = _pairs(tmp_path / "pairs", n=4)
    (pairs / "edited" / "p1.png").unlink()
    (pairs / "edited" / "p3.png").unlink()
    rc, err = _cli(["--pairs", str(pairs), "--base", str(base_checkpoint), "--name", "partial", *TINY_OVERRIDES,
                    "train.max_steps=1", "train.loss.multiview=false", "train.gan.enabled=false",
                    f"train.exp_dir={tmp_path / 'exps'}"], capsys)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, err
    assert "p1.png" in warnings[0] and "p3.png" in warnings[0] and "p0.png" not in warnings[0]
    assert (tmp_path / "exps" / "partial" / "final" / "model.safetensors").is_file()


def _record_prompts(monkeypatch) -> list[tuple[list[str], list[bool]]]:
    """Spy on the student's training forwards: (texts, use_text) per call (texts None = reference images)."""
    from training.student import Student

    calls: list = []
    forward = Student.forward

    def spy(self, image, reference, cameras, deterministic=False, texts=None, use_text=None):
        calls.append((None if texts is None else list(texts),
                      [False] * image.shape[0] if use_text is None else use_text.tolist()))
        return forward(self, image, reference, cameras, deterministic, texts, use_text)

    monkeypatch.setattr(Student, "forward", spy)
    return calls


@pytest.mark.parametrize("instruction", ["make it bronze", None])
def test_clip_base_prompts_are_the_instruction_or_the_reference(tmp_path, capsys, monkeypatch, clip_base_checkpoint,
                                                                 instruction):
    """A CLIP-prompt base: every sample's prompt is the --instruction text, without one its reference image."""
    from pipelines import instruct_pix2pix as ip2p_module
    from pipelines.instruct_pix2pix import InstructPix2PixConfig, InstructPix2PixEditor, build_tiny_instruct_pix2pix

    def tiny_editor(cfg, device=None):  # what the --instruction run builds instead of the real InstructPix2Pix
        return InstructPix2PixEditor.from_pipeline(build_tiny_instruct_pix2pix(),
                                                   InstructPix2PixConfig(steps=2, resolution=64))

    monkeypatch.setattr(ip2p_module, "InstructPix2PixEditor", tiny_editor)
    calls = _record_prompts(monkeypatch)
    pairs = _pairs(tmp_path / "pairs", n=2, with_edits=instruction is None)
    argv = ["--pairs", str(pairs), "--base", str(clip_base_checkpoint), "--name", "clip", *TINY_OVERRIDES,
            "train.max_steps=2", "train.loss.multiview=false", "train.gan.enabled=false",
            f"train.exp_dir={tmp_path / 'exps'}"]
    rc, err = _cli([*argv, *(["--instruction", instruction] if instruction else [])], capsys)
    assert rc == 0, err
    assert len(calls) == 2
    for texts, use_text in calls:
        if instruction:
            assert texts == [instruction] * len(texts) and all(use_text)
        else:
            assert not any(use_text)  # the reference image, never an empty text
    from models.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "exps" / "clip" / "final").configs["encoder"].prompt_encoder == "clip"
