"""test_scripts.py end to end on tiny random models: outputs, naming, determinism, bad inputs."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test_scripts
from datasets.inference_inputs import build_jobs, prepare_portrait, read_prompts_file


def _portrait(seed: int, size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "input").mkdir(parents=True)
    (d / "ref").mkdir()
    _portrait(0).save(d / "input" / "alice.png")
    _portrait(1).save(d / "input" / "bob.jpg")
    _portrait(2).save(d / "ref" / "alice.png")
    _portrait(3).save(d / "ref" / "bob.png")
    return d


def _run(args: list[str]) -> int:
    return test_scripts.main(["--random-init", "--tiny", "--device", "cpu", *args])


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_cli_writes_named_outputs(data_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(out), "--save-triplane", "--mesh",
               "--mesh-resolution", "32"])
    assert rc == 0
    for stem in ("alice", "bob"):
        strip = Image.open(out / f"{stem}_mv.png")
        view = Image.open(out / f"{stem}_view0.png")
        side = view.size[1]
        # input | reference | 3 views, square tiles, no gaps
        assert strip.size == (5 * side, side)
        assert view.size == (side, side)
        assert (out / f"{stem}_view2.png").exists()
        from safetensors.torch import load_file

        tri = load_file(str(out / f"{stem}_triplane.safetensors"))["triplane"]
        assert tri.dtype == torch.float32 and tri.ndim == 4 and tri.shape[:2] == (1, 96)
    assert not list(out.glob(".*partial*"))


def test_cli_is_deterministic(data_dir: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["--data-dir", str(data_dir), "--output-dir", str(a), "--save-triplane"]) == 0
    assert _run(["--data-dir", str(data_dir), "--output-dir", str(b), "--save-triplane"]) == 0
    assert _digest(a) == _digest(b)


def test_cli_yaws_and_single_ref(data_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(out), "--ref", str(data_dir / "ref" / "bob.png"),
               "--yaws", "-20", "20", "--pitch", "5"])
    assert rc == 0
    side = Image.open(out / "alice_view0.png").size[1]
    assert Image.open(out / "alice_mv.png").size == (4 * side, side)
    assert not (out / "alice_view2.png").exists()


def test_cli_video(data_dir: Path, tmp_path: Path):
    from utils.video import read_video_meta

    out = tmp_path / "out"
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(out), "--video", "--video-frames", "5",
               "--video-fps", "10"])
    assert rc == 0
    meta = read_video_meta(out / "alice_orbit.mp4")
    assert meta["nframes"] == 5 and abs(meta["fps"] - 10) < 1e-6


def test_cli_reconstruction_has_no_reference_tile(data_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rc = _run(["--random-init-kind", "reconstruct", "--data-dir", str(data_dir), "--output-dir", str(out)])
    assert rc == 0
    side = Image.open(out / "alice_view0.png").size[1]
    assert Image.open(out / "alice_mv.png").size == (4 * side, side)


def test_cli_bad_inputs_are_reported_and_skipped(tmp_path: Path, capsys):
    d = tmp_path / "imgs"
    (d / "input").mkdir(parents=True)
    (d / "ref").mkdir()
    _portrait(0, mode="RGBA").save(d / "input" / "rgba.png")
    _portrait(1, mode="L").save(d / "input" / "grey.png")
    _portrait(2, mode="RGB").convert("P").save(d / "input" / "palette.png")
    Image.fromarray((np.random.default_rng(3).random((64, 64)) * 65535).astype(np.uint16)).save(d / "input" / "deep.png")
    _portrait(4, size=(80, 60)).save(d / "input" / "wide.png")
    (d / "input" / "broken.png").write_bytes(b"not an image at all")
    _portrait(5).save(d / "input" / "noref.png")
    for stem in ("rgba", "grey", "palette", "deep", "wide", "broken"):
        _portrait(9).save(d / "ref" / f"{stem}.png")
    out = tmp_path / "out"
    rc = _run(["--data-dir", str(d), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1  # something failed → non-zero
    for stem in ("rgba", "grey", "palette", "deep", "wide"):
        assert (out / f"{stem}_mv.png").exists(), stem
    assert "broken.png" in err and not (out / "broken_mv.png").exists()
    assert "noref.png" in err and not (out / "noref_mv.png").exists()
    assert "--align" in err  # the non-square warning suggests aligning


def test_missing_checkpoint_says_where_to_get_it(tmp_path: Path, capsys):
    rc = test_scripts.main(["--checkpoint", str(tmp_path / "3dpe.pt"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "3dpe.pt" in err and "pretrained_models" in err and "--random-init" in err


def test_prompt_precedence(tmp_path: Path):
    d = tmp_path / "imgs"
    (d / "input").mkdir(parents=True)
    for s in ("a", "b", "c"):
        _portrait(0).save(d / "input" / f"{s}.png")
    (d / "prompts.txt").write_text("a\tmake it gold\nmake it bronze\n")
    jobs, problems = build_jobs(d)  # no ref/: prompts.txt is read
    assert [(j.stem, j.prompt) for j in jobs] == [("a", "make it gold"), ("b", "make it bronze"), ("c", "make it bronze")]
    (d / "ref").mkdir()
    _portrait(1).save(d / "ref" / "b.png")
    jobs, problems = build_jobs(d)  # ref/ exists: prompts.txt is not read unless named
    assert [j.stem for j in jobs] == ["b"] and len(problems) == 2
    jobs, _ = build_jobs(d, prompts_file=d / "prompts.txt")
    assert {j.stem: (j.reference_path is not None, j.prompt) for j in jobs} == {
        "a": (False, "make it gold"), "b": (True, None), "c": (False, "make it bronze")}
    jobs, _ = build_jobs(d, ref=d / "ref" / "b.png", prompts_file=d / "prompts.txt")
    assert all(j.reference_path is not None and j.prompt is None for j in jobs)
    jobs, _ = build_jobs(d, prompt="zombie", ref=d / "ref" / "b.png")
    assert all(j.prompt == "zombie" and j.reference_path is None for j in jobs)
    per_stem, default = read_prompts_file(d / "prompts.txt")
    assert per_stem == {"a": "make it gold"} and default == "make it bronze"


def test_prepare_portrait_crops_and_resizes():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = prepare_portrait(_portrait(0, size=(100, 60)), 64)
    assert out.size == (64, 64) and any("--align" in str(w.message) for w in caught)
    assert prepare_portrait(_portrait(0, size=(64, 64)), 64).size == (64, 64)


def test_cli_text_prompt_with_clip_module(data_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rc = _run(["--prompt-encoder", "clip", "--data-dir", str(data_dir), "--output-dir", str(out),
               "--prompt", "make him look like a golden statue"])
    assert rc == 0
    assert (out / "alice_prompt.txt").read_text().strip() == "make him look like a golden statue"
    side = Image.open(out / "alice_view0.png").size[1]
    # CLIP text prompt: no reference tile
    assert Image.open(out / "alice_mv.png").size == (4 * side, side)


def _tiny_models(kind: str):
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(7)
    if kind == "edit":
        from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig

        enc = EditingEncoder(EditingEncoderConfig.tiny())
    else:
        from models.live3d.encoder import Live3DConfig, Live3DEncoder

        enc = Live3DEncoder(Live3DConfig.tiny("LT"))
    return enc.eval(), TriplaneRenderer(RendererConfig.tiny()).eval()


@pytest.mark.parametrize("kind", ["edit", "reconstruct"])
def test_cli_loads_original_layout_checkpoints(kind: str, data_dir: Path, tmp_path: Path, tiny_original_architectures):
    """A 3dpe.pt / Live3D .pt written in the original layout loads strictly and gives our model's triplane."""
    from safetensors.torch import load_file

    from models.checkpoint import export_original_3dpe
    from utils.image_io import load_image, pil_to_tensor

    enc, ren = _tiny_models(kind)
    ckpt = tmp_path / ("3dpe.pt" if kind == "edit" else "encoder_render_LT_90000.pt")
    if kind == "edit":
        export_original_3dpe(ckpt, enc.state_dict(), ren.state_dict(), step=120000, opts={"batch_size": 2})
    else:
        torch.save({"encoder_state_dict": enc.state_dict(), "renderer_state_dict": ren.state_dict(),
                    "discriminator_state": {}, "opts": {}, "best_val_loss": None, "step": 90000,
                    "encoder_optimizer": {}, "render_optimizer": {}}, ckpt)
    out = tmp_path / "out"
    rc = test_scripts.main(["--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--output-dir", str(out),
                            "--device", "cpu", "--save-triplane"])
    assert rc == 0
    got = load_file(str(out / "alice_triplane.safetensors"))["triplane"]
    side = enc.config.input_resolution
    x = pil_to_tensor(load_image(data_dir / "input" / "alice.png").resize((side, side), 3))
    with torch.no_grad():
        if kind == "edit":
            ref = pil_to_tensor(load_image(data_dir / "ref" / "alice.png").resize((side, side), 3))
            tokens, bias = enc.encode_prompt(reference=ref)
            want = enc(x, tokens, bias)
        else:
            want = enc(x)
    # the CLI's encoding is this one (same weights, image, batch of 1, ops and threads): bit-equal on any CPU
    assert torch.equal(got, want)
    strip = Image.open(out / "alice_mv.png")
    assert strip.size[0] == strip.size[1] * (5 if kind == "edit" else 4)


def test_cli_loads_project_format(data_dir: Path, tmp_path: Path, tiny_original_architectures):
    import json
    import subprocess
    import sys

    from models.checkpoint import export_original_3dpe
    from models.editing.editing_encoder import EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from utils.config import to_dict

    enc, ren = _tiny_models("edit")
    export_original_3dpe(tmp_path / "3dpe.pt", enc.state_dict(), ren.state_dict())
    dst = tmp_path / "converted"
    arch = tmp_path / "arch.json"  # the converter runs in its own process: the architecture goes by --config
    arch.write_text(json.dumps({"encoder": to_dict(EditingEncoderConfig.tiny()), "renderer": to_dict(RendererConfig.tiny())}))
    r = subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", str(tmp_path / "3dpe.pt"), str(dst),
                        "--config", str(arch)], cwd=Path(test_scripts.__file__).parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert test_scripts.main(["--checkpoint", str(tmp_path / "3dpe.pt"), "--data-dir", str(data_dir),
                              "--output-dir", str(a), "--device", "cpu"]) == 0
    assert test_scripts.main(["--checkpoint", str(dst), "--data-dir", str(data_dir), "--output-dir", str(b),
                              "--device", "cpu"]) == 0
    assert _digest(a) == _digest(b)


def test_cli_text_prompt_through_instruct_pix2pix_bridge(data_dir: Path, tmp_path: Path, monkeypatch):
    """A MAE checkpoint + --prompt: the input is edited in 2D and used as the reference tile."""
    import pipelines.instruct_pix2pix as ip2p

    calls = []

    class TinyEditor(ip2p.InstructPix2PixEditor):
        def __init__(self, cfg, device=None):
            calls.append(cfg)
            tiny = ip2p.build_tiny_instruct_pix2pix(seed=0)
            cfg.steps, cfg.resolution = 2, 64
            super().__init__(cfg, device=tiny.device, pipe=tiny)

    monkeypatch.setattr(ip2p, "InstructPix2PixEditor", TinyEditor)
    weights = tmp_path / "instruct-pix2pix"  # what the check before loading looks for
    weights.mkdir()
    (weights / "model_index.json").write_text("{}")
    out = tmp_path / "out"
    rc = _run(["--data-dir", str(data_dir), "--output-dir", str(out), "--prompt", "make it bronze",
               "--ip2p-steps", "2", "--ip2p-model", str(weights)])
    assert rc == 0
    assert len(calls) == 1 and calls[0].guidance_scale == 7.5 and calls[0].image_guidance_scale == 1.5
    side = Image.open(out / "alice_view0.png").size[1]
    assert Image.open(out / "alice_mv.png").size == (5 * side, side)  # input | 2D-edited input | 3 views
    assert (out / "bob_prompt.txt").read_text().strip() == "make it bronze"


def test_run_inference_reports_what_it_did(tmp_path: Path):
    """The report (what tools/evaluate.py reads): inputs written with their edit seconds, and inputs skipped."""
    from tools.inference import parse_args, run_inference

    d = tmp_path / "imgs"
    (d / "input").mkdir(parents=True)
    (d / "ref").mkdir()
    _portrait(0).save(d / "input" / "a.png")
    _portrait(1).save(d / "input" / "b.png")
    _portrait(2).save(d / "ref" / "a.png")  # b has no reference: skipped
    report = run_inference(parse_args(["--random-init", "--tiny", "--device", "cpu", "--data-dir", str(d),
                                       "--output-dir", str(tmp_path / "out")]))
    assert report.written == ["a"] and list(report.seconds) == ["a"] and report.seconds["a"] > 0
    assert len(report.skipped) == 1 and "b.png" in report.skipped[0] and report.failed == []
    assert report.exit_code == 1
    assert (tmp_path / "out" / "a_mv.png").is_file() and not (tmp_path / "out" / "b_mv.png").exists()
