"""One editor front end: the prompt dispatch lives in PortraitEditor, the shared options in tools/editor_options.py."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.editor import PortraitEditor

SHARED_FLAGS = (
    "--checkpoint", "--device", "--precision", "--channels-last", "--seed", "--random-init", "--random-init-kind",
    "--prompt-encoder", "--tiny", "--ip2p-model", "--ip2p-steps", "--ip2p-guidance", "--ip2p-image-guidance",
)


def _img(seed: int, side: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _Bridge:
    """A stand-in for InstructPix2Pix: mirrors the image and records the instructions."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, images: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        self.calls.append(list(instructions))
        return images.flip(-1)


@pytest.fixture(scope="module")
def mae() -> PortraitEditor:
    return PortraitEditor.random_init(tiny=True, seed=0, device="cpu")


@pytest.fixture(scope="module")
def clip() -> PortraitEditor:
    return PortraitEditor.random_init(tiny=True, seed=0, device="cpu", prompt_encoder="clip")


# ------------------------------------------------------------------ the prompt dispatch
def test_prompt_is_per_input_only_for_a_text_through_the_bridge(mae, clip):
    recon = PortraitEditor.random_init(kind="reconstruct", tiny=True, seed=0, device="cpu")
    assert mae.prompt_is_per_input("make it gold") is True
    assert mae.prompt_is_per_input(None) is False
    assert clip.prompt_is_per_input("make it gold") is False and clip.prompt_is_per_input(None) is False
    assert recon.prompt_is_per_input("make it gold") is False


def test_mae_text_edits_this_input_and_uses_the_edit_as_reference(mae):
    bridge = _Bridge()
    mae.text_bridge = bridge
    try:
        image, other = _img(0), _img(1)
        emb = mae.prompt(image=image, text="make it gold")
        assert bridge.calls == [["make it gold"]]
        assert torch.equal(emb.reference, image.flip(-1)) and emb.text == "make it gold"
        assert torch.equal(emb.tokens, mae.prompt(reference=image.flip(-1)).tokens)
        assert not torch.equal(mae.prompt(image=other, text="make it gold").tokens, emb.tokens)  # per input
        # one prompt per MAE model: with a reference too, the text is used (as --prompt overrides --ref)
        both = mae.prompt(image=image, reference=_img(5), text="make it gold")
        assert torch.equal(both.tokens, emb.tokens)
    finally:
        mae.text_bridge = None
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        mae.prompt(image=image, text="make it gold")  # no bridge


def test_reference_and_clip_prompts_do_not_depend_on_the_input(mae, clip):
    ref = _img(3)
    with torch.no_grad():
        want_ref, _ = mae.encoder.encode_prompt(reference=ref)
        want_text, want_text_bias = clip.encoder.encode_prompt(text=["a bronze statue"])
        want_mix, want_mix_bias = clip.encoder.encode_prompt(reference=ref, text=["a bronze statue"], image_weight=0.3)
    emb = mae.prompt(image=_img(0), reference=ref)
    assert torch.equal(emb.tokens, want_ref) and emb.bias is None and torch.equal(emb.reference, ref)
    text = clip.prompt(image=_img(0), text="a bronze statue")
    assert torch.equal(text.tokens, want_text) and torch.equal(text.bias, want_text_bias) and text.reference is None
    mixed = clip.prompt(reference=ref, text="a bronze statue", image_weight=0.3)
    assert torch.equal(mixed.tokens, want_mix) and torch.equal(mixed.bias, want_mix_bias)
    assert torch.equal(mae.encode_prompt(reference=ref).tokens, want_ref)  # the earlier name still works


def test_prompt_refuses_what_it_cannot_encode(mae):
    recon = PortraitEditor.random_init(kind="reconstruct", tiny=True, seed=0, device="cpu")
    with pytest.raises(ValueError, match="reconstructs"):
        recon.prompt(reference=_img(0))
    with pytest.raises(ValueError, match="reference image or a text"):
        mae.prompt(image=_img(0))


# ------------------------------------------------------------------ shared options
def _help(tool: str, capsys) -> str:
    import importlib

    module = importlib.import_module(tool)
    parse = module.main if tool == "tools.evaluate" else module.parse_args  # evaluate builds its parser in main
    with pytest.raises(SystemExit) as info:
        parse(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("tool", ["test_scripts", "tools.demo", "tools.edit_video", "tools.evaluate"])
def test_every_tool_has_every_shared_option(tool: str, capsys):
    text = _help(tool, capsys)
    missing = [f for f in SHARED_FLAGS if f not in text.split()]
    assert not missing, f"{tool} lacks {missing}"


def test_test_scripts_is_the_inference_tool(capsys):
    import test_scripts
    from tools import inference

    assert test_scripts.main is inference.main
    with pytest.raises(SystemExit):
        test_scripts.parse_args(["--help"])
    assert "--channels-last" in capsys.readouterr().out


def test_editor_argv_passes_the_options_on():
    from tools.editor_options import add_editor_arguments, editor_argv

    p = argparse.ArgumentParser()
    add_editor_arguments(p, checkpoint_default=None)
    given = ["--device", "cpu", "--random-init", "--tiny", "--ip2p-steps", "3", "--precision", "bf16"]
    words = editor_argv(p.parse_args(given))
    assert sorted(words) == sorted(given)  # only what differs from the defaults; no checkpoint when None
    assert vars(p.parse_args(words)) == vars(p.parse_args(given))
    assert editor_argv(p.parse_args([])) == []


def test_editor_from_args_applies_every_option(monkeypatch):
    """--channels-last and the bridge options reach the editor (also with --random-init)."""
    from tools.editor_options import add_editor_arguments, editor_from_args

    p = argparse.ArgumentParser()
    add_editor_arguments(p)
    args = p.parse_args(["--random-init", "--tiny", "--device", "cpu", "--channels-last", "--prompt-encoder", "clip",
                         "--ip2p-steps", "3", "--ip2p-guidance", "5", "--seed", "4"])
    editor = editor_from_args(args, needs_text=True)
    assert editor.prompt_encoder_kind == "clip"
    conv = next(m for m in editor.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    bridge = editor.text_bridge
    cfg = getattr(bridge, "config", None) or bridge.cfg  # (the attribute may be renamed .config)
    assert (cfg.steps, cfg.guidance_scale, cfg.seed) == (3, 5.0, 4)
    assert editor_from_args(args, needs_text=False).text_bridge is None


# ------------------------------------------------------------------ a missing checkpoint, the same in every tool
def _tiny_video(path: Path) -> Path:
    from utils.video import AtomicVideoWriter

    with AtomicVideoWriter(path, fps=5) as w:
        for i in range(2):
            w.append(np.full((32, 32, 3), 40 * i, dtype=np.uint8))
    return path


@pytest.mark.parametrize("tool", ["test_scripts", "demo", "edit_video", "evaluate"])
def test_missing_checkpoint_is_one_line_and_exit_2_in_every_tool(tool: str, tmp_path: Path, capsys):
    missing = str(tmp_path / "3dpe.pt")
    (tmp_path / "input").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "input" / "a.png")
    if tool == "test_scripts":
        import test_scripts

        rc = test_scripts.main(["--checkpoint", missing, "--data-dir", str(tmp_path), "--device", "cpu"])
    elif tool == "demo":
        pytest.importorskip("gradio", reason="gradio is optional (pip install gradio)")
        from tools import demo

        rc = demo.main(["--checkpoint", missing, "--device", "cpu"])
    elif tool == "edit_video":
        from tools import edit_video

        rc = edit_video.main(["--video", str(_tiny_video(tmp_path / "in.mp4")), "--ref", "x.png",
                              "--out", str(tmp_path / "o.mp4"), "--checkpoint", missing, "--device", "cpu"])
    else:
        from tools import evaluate

        rc = evaluate.main(["--results", str(tmp_path / "res"), "--data-dir", str(tmp_path), "--checkpoint", missing,
                            "--device", "cpu"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"checkpoint '{missing}' not found" in err[0]
    assert "pretrained_models" in err[0] and "--random-init" in err[0]
