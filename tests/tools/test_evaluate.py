"""Evaluation plumbing with random tiny nets: identical images score as identical, missing weights degrade cleanly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.arcface import IdentityEncoder, IRSE50, load_ir_se50
from pipelines.editor import PortraitEditor
from rounding import gamma32
from utils.errors import MissingWeightsError
from tools.evaluate import (NOT_APPLICABLE, UNAVAILABLE, EditSample, Evaluator, load_results_folder, main,
                            to_markdown)

# The cosine of two float32 unit embeddings of D = 512 (identity: F.normalize, then a dot product) vs the exact 1 of
# identical images (tests/rounding.py): the norm's sum of 512 squares (γ₅₁₂), its sqrt, the division and the squaring
# (4 roundings) put Σe² within γ₅₁₆ of 1, and the dot product's own sum adds γ₅₁₂: γ₁₀₂₈ = 6.1e-5 (measured ≤ 1.8e-7).
# Its norm, sqrt(Σe²) rounded: γ₁₀₂₈ / 2 + one rounding ≤ γ₅₁₅ = 3.1e-5 (measured 6e-8).
UNIT_COSINE_512 = gamma32(1028)
UNIT_NORM_512 = gamma32(515)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    import lpips

    from models.editing.clip_prompt import build_open_clip, tiny_open_clip_config
    from pipelines.clip_scores import ClipScorer

    torch.manual_seed(0)
    clip = ClipScorer.from_model(build_open_clip(model_cfg=tiny_open_clip_config()), device="cpu")
    ident = IdentityEncoder(IRSE50(width=16, units=(1, 1, 1, 1)))
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    return Evaluator(clip=clip, identity=ident, lpips=lambda a, b: net(a, b).flatten())


def _img(seed: int, side: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, side, side, generator=g) * 2 - 1


def test_identical_images_score_identical(evaluator: Evaluator):
    x = _img(0)
    s = EditSample("a", input=x, views=x.repeat(3, 1, 1, 1), frontal=1, reference=_img(1))
    m = evaluator.score(s)
    assert m["identity"] == pytest.approx(1.0, abs=UNIT_COSINE_512)  # measured 0
    assert m["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert m["clip_multiview"] == pytest.approx(1.0, abs=1e-5)
    # the mean of the 6 off-diagonal cosines, (Σ all 9 − Σ diagonal) / 6: its sums and division add 1.5·γ₈ + γ₂/2 +
    # 2 roundings < γ₁₆ (rows embedded in one batch may differ by rounding: 1 − cos is its square, ~1e-10)
    assert m["identity_multiview"] == pytest.approx(1.0, abs=UNIT_COSINE_512 + gamma32(16))  # measured 1.8e-7
    assert m["clip_directional"] == pytest.approx(0.0, abs=1e-5)  # no change → no direction


def test_edit_towards_reference_scores_positive(evaluator: Evaluator):
    x, ref = _img(0), _img(1)
    s = EditSample("a", input=x, views=ref.repeat(3, 1, 1, 1), frontal=1, reference=ref)
    m = evaluator.score(s)
    assert m["clip_directional"] == pytest.approx(1.0, abs=1e-5)
    assert m["lpips"] > 0


def test_text_edit_metrics_and_summary(evaluator: Evaluator):
    x = _img(0)
    s = EditSample("t", input=x, views=torch.cat([_img(2), _img(3)]), frontal=0, prompt="a golden statue")
    result = evaluator.evaluate([s])
    assert -1 <= result["mean"]["clip_image_text"] <= 1
    assert -1 <= result["mean"]["clip_directional"] <= 1
    assert result["count"] == 1 and "t" in result["per_sample"]
    assert "clip_image_text" in to_markdown(result)


def test_missing_weights_are_reported_not_fatal(tmp_path: Path):
    ev = Evaluator.from_files(clip_weights=str(tmp_path / "nope.bin"), id_weights=str(tmp_path / "nope.pth"),
                              lpips_dir=str(tmp_path), device="cpu")
    assert ev.clip is None and ev.identity is None and ev.lpips is None
    assert set(ev.reasons) == {"clip", "identity", "lpips"}
    x = _img(0)
    result = ev.evaluate([EditSample("a", input=x, views=x.repeat(2, 1, 1, 1))])
    assert result["mean"]["identity"] == UNAVAILABLE and set(result["unavailable"]) == {"clip", "identity", "lpips"}
    with pytest.raises(MissingWeightsError, match="model_ir_se50"):
        load_ir_se50(tmp_path / "model_ir_se50.pth")


def test_ir_se50_roundtrip(tmp_path: Path):
    net = IRSE50()
    assert sum(p.numel() for p in net.parameters()) > 40e6  # the real IR-SE50 size
    torch.save(net.state_dict(), tmp_path / "model_ir_se50.pth")
    enc = load_ir_se50(tmp_path / "model_ir_se50.pth")
    out = enc(_img(0, 256))
    assert out.shape == (1, 512) and torch.allclose(out.norm(dim=1), torch.ones(1), rtol=0, atol=UNIT_NORM_512)


def test_cli_on_results_folder(tmp_path: Path):
    data = tmp_path / "data"
    (data / "input").mkdir(parents=True)
    res = tmp_path / "res"
    res.mkdir()
    arr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(data / "input" / "a.png")
    for i in range(3):
        Image.fromarray(arr).save(res / f"a_view{i}.png")
    (res / "a_prompt.txt").write_text("a statue\n")
    samples = load_results_folder(res, data)
    assert len(samples) == 1 and samples[0].prompt == "a statue" and samples[0].views.shape[0] == 3
    rc = main(["--results", str(res), "--data-dir", str(data), "--clip-weights", str(tmp_path / "x.bin"),
               "--id-weights", str(tmp_path / "x.pth"), "--lpips-dir", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    assert (res / "metrics.json").exists() and "unavailable" in (res / "metrics.md").read_text()


def test_not_applicable_is_told_apart_from_unavailable(evaluator: Evaluator):
    """No prompt and no reference: the CLIP direction/text scores do not apply; missing weights are 'unavailable'."""
    x = _img(0)
    bare = EditSample("bare", input=x, views=torch.cat([_img(2), _img(3)]), frontal=0)  # no prompt, no reference
    m = evaluator.score(bare)
    assert m["clip_directional"] == NOT_APPLICABLE and m["clip_image_text"] == NOT_APPLICABLE
    assert isinstance(m["clip_multiview"], float) and isinstance(m["identity"], float)
    single = evaluator.score(EditSample("one", input=x, views=_img(2), prompt="a statue"))
    assert single["clip_multiview"] == NOT_APPLICABLE and isinstance(single["clip_image_text"], float)

    no_weights = Evaluator(reasons={"clip": "no clip", "identity": "no arcface", "lpips": "no alexnet"})
    texted = EditSample("texted", input=x, views=torch.cat([_img(2), _img(3)]), prompt="a statue")
    result = no_weights.evaluate([bare, texted])
    assert result["per_sample"]["bare"]["clip_image_text"] == NOT_APPLICABLE  # applies to nothing: N/A wins
    assert result["per_sample"]["texted"]["clip_image_text"] == UNAVAILABLE  # applies, but no weights
    assert result["mean"]["clip_image_text"] == UNAVAILABLE and result["mean"]["lpips"] == UNAVAILABLE
    md = to_markdown(result)
    assert "| bare | not applicable | not applicable |" in md and "| texted | unavailable | unavailable |" in md
    assert NOT_APPLICABLE != UNAVAILABLE

    only_bare = evaluator.evaluate([bare])  # weights present, nothing to apply the text scores to
    assert only_bare["mean"]["clip_image_text"] == NOT_APPLICABLE and isinstance(only_bare["mean"]["lpips"], float)
    assert "| clip_image_text | not applicable |" in to_markdown(only_bare)


# ------------------------------------------------------------------ evaluate --checkpoint: runtime and failures
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random 3DPE model (MAE prompt encoder) in the project format."""
    from models.checkpoint import save_pretrained

    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", {
        "encoder": editor.encoder.state_dict(), "renderer": editor.renderer.state_dict()}, "3dpe",
        {"encoder": editor.encoder.config, "renderer": editor.renderer.config}, {"test": True})


def _eval_data(root: Path, n: int = 3) -> Path:
    """input/<stem>.png and a different ref/<stem>.png per input (so each input encodes its own prompt)."""
    for sub in ("input", "ref"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        for sub, seed in (("input", i), ("ref", 100 + i)):
            arr = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / sub / f"p{i}.png")
    return root


def _eval_cli(tmp_path: Path, ckpt: Path, data: Path) -> int:
    return main(["--results", str(tmp_path / "res"), "--data-dir", str(data), "--checkpoint", str(ckpt),
                 "--device", "cpu", "--clip-weights", str(tmp_path / "x.bin"), "--id-weights", str(tmp_path / "x.pth"),
                 "--lpips-dir", str(tmp_path)])


def test_runtime_per_edit_is_the_median_edit_time(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    """A fake clock advances only inside the patched steps: model loading (100 s), image loading (7 s) and
    PNG writing (10 s) must not count; encode prompt (0.5 s) + edit (1 s) + render (0.25 s) must."""
    from types import SimpleNamespace

    import utils.image_io
    from tools import inference

    clock = {"t": 0.0}
    monkeypatch.setattr(inference, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))

    def advancing(fn, seconds):
        def wrapped(*a, **k):
            clock["t"] += seconds
            return fn(*a, **k)
        return wrapped

    load = PortraitEditor.from_pretrained
    monkeypatch.setattr(PortraitEditor, "from_pretrained", classmethod(lambda cls, *a, **k: advancing(load, 100)(*a, **k)))
    for name, sec in (("prompt", 0.5), ("edit", 1.0), ("render", 0.25)):
        monkeypatch.setattr(PortraitEditor, name, advancing(getattr(PortraitEditor, name), sec))
    monkeypatch.setattr(utils.image_io, "load_image", advancing(utils.image_io.load_image, 7))
    monkeypatch.setattr(utils.image_io, "save_png", advancing(utils.image_io.save_png, 10))

    assert _eval_cli(tmp_path, tiny_checkpoint, _eval_data(tmp_path / "data")) == 0
    result = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert result["runtime_seconds_per_edit"] == pytest.approx(1.75)
    assert [m["seconds"] for m in result["per_sample"].values()] == pytest.approx([1.75] * 3)
    assert result["inference"]["status"] == "ok"
    assert "Runtime per edit: 1.75 s (median over 3 inputs" in (tmp_path / "res" / "metrics.md").read_text()


def test_runtime_is_the_median_of_stored_durations():
    x = _img(0)
    samples = [EditSample(f"s{i}", input=x, views=x, seconds=sec) for i, sec in enumerate([0.2, 9.0, 0.4])]
    result = Evaluator().evaluate(samples)
    assert result["runtime_seconds_per_edit"] == pytest.approx(0.4)  # the median, not the mean (3.2)
    assert [result["per_sample"][f"s{i}"]["seconds"] for i in range(3)] == [0.2, 9.0, 0.4]


def test_failed_inference_is_reported_and_exits_nonzero(tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys):
    edit = PortraitEditor.edit
    calls = {"n": 0}

    def second_fails(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("simulated failure")
        return edit(self, *a, **k)

    monkeypatch.setattr(PortraitEditor, "edit", second_fails)
    rc = _eval_cli(tmp_path, tiny_checkpoint, _eval_data(tmp_path / "data"))
    assert rc != 0
    result = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert result["inference"]["status"] == "failed" and result["inference"]["exit_code"] == rc
    assert any("simulated failure" in e for e in result["inference"]["errors"])
    assert result["count"] == 2  # the inputs that did succeed are still scored
    md = (tmp_path / "res" / "metrics.md").read_text()
    assert md.startswith("**Inference failed**") and "simulated failure" in md
    assert "inference failed" in capsys.readouterr().err


def test_crashed_inference_is_a_failure(tmp_path: Path, monkeypatch):
    from tools import inference

    def crash(args):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(inference, "run_inference", crash)
    rc = main(["--results", str(tmp_path / "res"), "--data-dir", str(tmp_path), "--checkpoint", "x.pt"])
    assert rc == 1
    result = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert result["inference"] == {"status": "failed", "exit_code": 1, "error": "RuntimeError: CUDA error: out of memory",
                                   "errors": []}
    assert result["count"] == 0


def test_editor_options_are_passed_on_to_the_inference(tmp_path: Path):
    """evaluate's own --random-init/--random-init-kind/--tiny reach the inference run (no --inference-args needed)."""
    res = tmp_path / "res"
    rc = main(["--results", str(res), "--data-dir", str(_eval_data(tmp_path / "data", n=2)), "--random-init", "--tiny",
               "--random-init-kind", "reconstruct", "--device", "cpu", "--clip-weights", str(tmp_path / "x.bin"),
               "--id-weights", str(tmp_path / "x.pth"), "--lpips-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((res / "metrics.json").read_text())
    assert result["inference"]["status"] == "ok" and result["count"] == 2 and result["runtime_inputs_timed"] == 2
    strip = Image.open(res / "p0_mv.png")
    assert strip.size[0] == 4 * strip.size[1]  # a reconstruction: input | 3 views, no reference tile


def test_inference_run_gets_typed_options_with_inference_args_over_them(tmp_path: Path, monkeypatch):
    """evaluate hands the inference run an `InferenceOptions` (no argv round trip): its own folders and editor
    options, the test_scripts.py default checkpoint when it has none, and the words of --inference-args on top."""
    from tools import inference
    from tools.editor_options import DEFAULT_CHECKPOINT

    seen = []
    monkeypatch.setattr(inference, "run_inference", lambda options: seen.append(options) or inference.InferenceReport())
    main(["--results", str(tmp_path / "res"), "--data-dir", str(tmp_path / "data"), "--random-init", "--tiny",
          "--precision", "bf16", "--seed", "3", "--inference-args=--precision fp32 --align --yaws 0"])
    (options,) = seen
    assert (options.data_dir, options.output_dir) == (str(tmp_path / "data"), str(tmp_path / "res"))
    assert options.align and options.yaws == [0.0]
    e = options.editor
    assert (e.random_init, e.tiny, e.seed, e.precision, e.checkpoint) == (True, True, 3, "fp32", DEFAULT_CHECKPOINT)


#: tools/<module>.py → its command-line entry (tools/inference.py is the command `test_scripts.py`)
TOOL_ENTRIES = {"convert_checkpoint": "main", "datagen": "cli", "demo": "main", "edit_video": "main",
                "eg3d_samples": "main", "evaluate": "main", "preprocess": "main"}


def test_every_tool_is_named_as_typed_in_its_usage(capsys):
    """`python -m tools.X --help` says `usage: python -m tools.X`, not the file name."""
    import importlib

    commands = {p.stem for p in (Path(__file__).resolve().parents[2] / "tools").glob("*.py")
                if 'if __name__ == "__main__":' in p.read_text()}
    assert commands - {"inference"} == set(TOOL_ENTRIES)  # a new tool: add it here
    for name, entry in TOOL_ENTRIES.items():
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(f"tools.{name}"), entry)(["--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m tools.{name} "), name
