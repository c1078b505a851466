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
    "--checkpoint", "--device", "--precision", "--channels-last", "--keep-freed-memory", "--seed", "--random-init", "--random-init-kind",
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


# ------------------------------------------------------------------ the call: prompt → edit → views
def _inputs(editor: PortraitEditor, n: int) -> torch.Tensor:
    return torch.cat([_img(10 + i, editor.input_resolution) for i in range(n)])


def _counting_prompts(editor: PortraitEditor, monkeypatch) -> list:
    """Record every `editor.prompt` call (its `text`); the bridge's inner encoding of its edit counts too."""
    calls, real = [], editor.prompt
    monkeypatch.setattr(editor, "prompt", lambda **k: calls.append(k.get("text")) or real(**k))
    return calls


def test_call_encodes_a_reference_once_for_every_input_and_renders_each(mae, monkeypatch):
    from utils.cameras import original_test_cameras

    images, ref, cams = _inputs(mae, 2), _img(3, mae.input_resolution), original_test_cameras((-20.0, 20.0))
    want = mae.edit(images, mae.prompt(reference=ref))
    prompts, steps = _counting_prompts(mae, monkeypatch), []
    result = mae(images, reference=ref, cameras=cams, on_step=lambda step, i: steps.append((step, i)))
    assert prompts == [None] and torch.equal(result.triplanes, want)  # one encoding serves both inputs
    assert steps == [("prompt", None), ("edit", None), ("render", 0), ("render", 1)]
    assert result.views["image"].shape[:2] == (2, 2) and result.views["image_depth"].shape[:2] == (2, 2)
    assert torch.equal(result.views["image"][1], mae.render(want[1:], cams)["image"])
    assert result.reusable_prompt is result.prompt and torch.equal(result.reference(1), ref)
    again = mae(images, prompt=result.reusable_prompt)  # the caller reuses it: nothing encoded again
    assert prompts == [None] and torch.equal(again.triplanes, want) and again.views is None


def test_call_encodes_a_text_through_the_bridge_per_input_unless_given_the_image(mae, monkeypatch):
    bridge = _Bridge()
    monkeypatch.setattr(mae, "text_bridge", bridge)
    images = _inputs(mae, 2)
    prompts, steps = _counting_prompts(mae, monkeypatch), []
    result = mae(images, text="make it gold", on_step=lambda step, i: steps.append((step, i)))
    assert bridge.calls == [["make it gold"]] * 2 and prompts.count("make it gold") == 2  # one per input
    assert steps == [("prompt", 0), ("edit", 0), ("prompt", 1), ("edit", 1)]
    assert result.per_input and result.reusable_prompt is None  # made from these inputs: not for others
    assert torch.equal(result.reference(1), images[1:].flip(-1))
    assert torch.equal(result.triplanes[1:], mae.edit(images[1:], mae.prompt(reference=images[1:].flip(-1))))
    bridge.calls.clear()
    first = mae(images, text="make it gold", prompt_image=images[:1])  # one edit (a video's first face) for all
    assert bridge.calls == [["make it gold"]] and first.reusable_prompt is not None
    assert torch.equal(first.triplanes, mae.edit(images, mae.prompt(reference=images[:1].flip(-1))))


def test_call_encodes_a_clip_text_once_and_takes_a_precomputed_prompt(clip, monkeypatch):
    images = _inputs(clip, 2)
    emb = clip.prompt(text="a bronze statue")
    prompts = _counting_prompts(clip, monkeypatch)
    result = clip(images, text="a bronze statue")
    assert prompts == ["a bronze statue"] and result.reusable_prompt is not None and result.reference(0) is None
    assert torch.equal(result.triplanes, clip.edit(images, emb))
    given = clip(images, prompt=emb, text="ignored when a prompt is given")
    assert prompts == ["a bronze statue"] and torch.equal(given.triplanes, result.triplanes)


def test_call_reconstructs_with_a_live3d_checkpoint_and_renders_per_input_cameras():
    from utils.cameras import original_test_cameras

    recon = PortraitEditor.random_init(kind="reconstruct", tiny=True, seed=0, device="cpu")
    images = _inputs(recon, 2)
    cams = torch.stack([original_test_cameras((-10.0,)), original_test_cameras((25.0,))])  # N×V×25, V = 1
    result = recon(images, cameras=cams)
    planes = recon.reconstruct(images)
    assert torch.equal(result.triplanes, planes) and result.prompt is None and result.reference(0) is None
    assert torch.equal(result.views["image"][:, 0], recon.render(planes, cams[:, 0])["image"])  # one batched call
    with pytest.raises(ValueError, match="reconstructs"):
        recon(images, reference=_img(3, recon.input_resolution))


def test_portrait_preparer_reads_aligns_and_resizes(tmp_path: Path):
    """The one preparation of every tool: a non-square file is centre-cropped with a warning; with `align` the
    EG3D crop at the preparer's side, or (a reference may hold no face) the picture as it is."""
    from pipelines.portraits import PortraitPreparer
    from utils.errors import NoFaceError
    from utils.face_alignment import EMPIRICAL_LANDMARKS_512, Face

    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(wide)
    plain = PortraitPreparer(32)(wide)
    assert plain.tensor.shape == (1, 3, 32, 32) and plain.image.size == (32, 32) and not plain.aligned
    assert len(plain.warnings) == 1 and str(wide) in plain.warnings[0] and "--align" in plain.warnings[0]

    class Detector:
        def __init__(self, faces: bool):
            self.faces, self.keys = faces, []

        def detect(self, image, key=None):
            self.keys.append(key)
            return [Face(None, 0.97, EMPIRICAL_LANDMARKS_512 * image.width / 512)] if self.faces else []

    none = Detector(faces=False)
    with pytest.raises(NoFaceError):
        PortraitPreparer(32, align=True, detector=none)(wide)
    sketch = PortraitPreparer(32, align=True, detector=none)(wide, needs_face=False)
    assert not sketch.aligned and "--align" not in sketch.warnings[0]  # asked to align already: no such hint
    assert none.keys == [str(wide)] * 2  # the detector is told the file (landmark files are found by it)
    face = PortraitPreparer(32, align=True, detector=Detector(faces=True))(Image.new("RGB", (100, 100), "grey"))
    assert face.aligned and face.face_score == pytest.approx(0.97) and face.image.size == (32, 32)
    assert face.warnings == []


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
    words = {w.strip(",") for w in text.split()}  # "--keep-freed-memory, --no-keep-freed-memory"
    missing = [f for f in SHARED_FLAGS if f not in words]
    assert not missing, f"{tool} lacks {missing}"


def test_test_scripts_is_the_inference_tool(capsys):
    import test_scripts
    from tools import inference

    assert test_scripts.main is inference.main
    with pytest.raises(SystemExit):
        test_scripts.parse_args(["--help"])
    assert "--channels-last" in capsys.readouterr().out


def test_editor_options_are_typed_and_reach_the_inference_run():
    """The shared options become an `EditorOptions` (the flags are its fields, their defaults its defaults), which
    an inference run takes as its defaults (tools/evaluate.py: no argv round trip); words given still win."""
    from dataclasses import replace

    from pipelines.instruct_pix2pix import InstructPix2PixConfig
    from tools.editor_options import EDITOR_FLAGS, EditorOptions, add_editor_arguments
    from tools.inference import InferenceOptions, parse_args

    p = argparse.ArgumentParser()
    add_editor_arguments(p, defaults=EditorOptions(checkpoint=None))
    given = ["--device", "cpu", "--random-init", "--tiny", "--ip2p-steps", "3", "--precision", "bf16"]
    options = EditorOptions.from_args(p.parse_args(given))
    assert options == EditorOptions(checkpoint=None, device="cpu", random_init=True, tiny=True, ip2p_steps=3,
                                    precision="bf16")
    assert EditorOptions.from_args(p.parse_args([])) == EditorOptions(checkpoint=None)
    assert EditorOptions.from_args(p.parse_args(["--no-keep-freed-memory"])).keep_freed_memory is False
    assert set(SHARED_FLAGS) | {"--compile"} == set(EDITOR_FLAGS)
    run = parse_args(["--precision", "fp32", "--align"], defaults=InferenceOptions(data_dir="d", editor=options))
    assert run.editor == replace(options, precision="fp32") and run.align and run.data_dir == "d"
    assert parse_args([]) == InferenceOptions()  # the command line's defaults are the dataclass's
    bridge, default = EditorOptions().instruct_pix2pix(), InstructPix2PixConfig()
    assert (bridge.model, bridge.steps, bridge.guidance_scale, bridge.image_guidance_scale, bridge.seed) == (
        default.model, default.steps, default.guidance_scale, default.image_guidance_scale, default.seed)


def test_editor_options_apply_every_option(monkeypatch):
    """--channels-last and the bridge options reach the editor (also with --random-init)."""
    from tools.editor_options import EditorOptions, add_editor_arguments

    p = argparse.ArgumentParser()
    add_editor_arguments(p)
    args = p.parse_args(["--random-init", "--tiny", "--device", "cpu", "--channels-last", "--prompt-encoder", "clip",
                         "--ip2p-steps", "3", "--ip2p-guidance", "5", "--seed", "4"])
    editor = EditorOptions.from_args(args).build(needs_text=True)
    assert editor.prompt_encoder_kind == "clip"
    conv = next(m for m in editor.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    bridge = editor.text_bridge
    cfg = getattr(bridge, "config", None) or bridge.cfg  # (the attribute may be renamed .config)
    assert (cfg.steps, cfg.guidance_scale, cfg.seed) == (3, 5.0, 4)
    assert EditorOptions.from_args(args).build(needs_text=False).text_bridge is None


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


def test_editor_option_choices_come_from_the_option_types():
    """Every `Literal` field of `EditorOptions` is a command-line choice list derived from the type, not restated."""
    import argparse
    import typing

    from tools.editor_options import EditorOptions, add_editor_arguments

    p = argparse.ArgumentParser()
    add_editor_arguments(p)
    by_dest = {a.dest: a for a in p._actions}
    literal = {name: typing.get_args(tp) for name, tp in typing.get_type_hints(EditorOptions).items()
               if typing.get_origin(tp) is typing.Literal}
    assert {"precision", "prompt_encoder", "random_init_kind"} <= set(literal)
    for name, values in literal.items():
        assert tuple(by_dest[name].choices) == values, name


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_editor_keeps_freed_memory_unless_told_not_to(monkeypatch, keep: bool):
    """A CPU editor built from the shared options switches glibc to reusing freed blocks (a 512 view 2.2 → 1.5 s on
    a 2-core Xeon: every large tensor was mapped and page-faulted afresh); `--no-keep-freed-memory` leaves it."""
    import utils.device
    from tools.editor_options import EditorOptions

    calls = []
    monkeypatch.setattr(utils.device, "keep_freed_cpu_memory", lambda device: calls.append(device.type) or True)
    EditorOptions(checkpoint=None, device="cpu", random_init=True, tiny=True, keep_freed_memory=keep).build(
        needs_text=False, warn_random_init=False)
    assert calls == (["cpu"] if keep else [])
