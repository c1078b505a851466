"""Evaluation plumbing with random tiny nets: identical images score as identical, missing weights degrade cleanly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.arcface import IdentityEncoder, IRSE50, load_ir_se50
from utils.errors import MissingWeightsError
from tools.evaluate import EditSample, Evaluator, load_results_folder, main, to_markdown


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
    assert m["identity"] == pytest.approx(1.0, abs=1e-5)
    assert m["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert m["clip_multiview"] == pytest.approx(1.0, abs=1e-5)
    assert m["identity_multiview"] == pytest.approx(1.0, abs=1e-5)
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
    assert result["mean"]["identity"] is None and set(result["unavailable"]) == {"clip", "identity", "lpips"}
    with pytest.raises(MissingWeightsError, match="model_ir_se50"):
        load_ir_se50(tmp_path / "model_ir_se50.pth")


def test_ir_se50_roundtrip(tmp_path: Path):
    net = IRSE50()
    assert sum(p.numel() for p in net.parameters()) > 40e6  # the real IR-SE50 size
    torch.save(net.state_dict(), tmp_path / "model_ir_se50.pth")
    enc = load_ir_se50(tmp_path / "model_ir_se50.pth")
    out = enc(_img(0, 256))
    assert out.shape == (1, 512) and torch.allclose(out.norm(dim=1), torch.ones(1), atol=1e-5)


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
