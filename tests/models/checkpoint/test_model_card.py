"""Model cards (README.md with Hub metadata) written by training, the converter and the evaluator, parsed back."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_cache import add_to_cache, use_offline_cache
from models import checkpoint as ck
from models.checkpoint.model_card import read_model_card, write_model_card

PLACEHOLDERS = re.compile(r"\b(TBD|TODO|N/A|None|null|unknown)\b|\?\?")


def no_placeholders(folder: Path) -> bool:
    """No placeholder words outside code blocks (a training config may hold a real `null`)."""
    text = re.sub(r"```.*?```", "", (folder / "README.md").read_text(), flags=re.S)
    return PLACEHOLDERS.search(text) is None


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_hub_parses(folder: Path) -> dict:
    """huggingface_hub's own parser accepts the card; returns its metadata."""
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.to_dict()


def tiny_3dpe_pt(dst: Path, seed: int = 3) -> Path:
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(seed)
    enc, ren = EditingEncoder(EditingEncoderConfig.tiny()), TriplaneRenderer(RendererConfig.tiny())
    return ck.export_original_3dpe(dst, enc.state_dict(), ren.state_dict(), step=120000, opts={"batch_size": 2})


# ------------------------------------------------------------------------------------------------------------
# a tiny training run started from a Hub id, on datagen output
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.training.test_training import make_tiny_dataset, tiny_config
    from training.train import main

    tmp = tmp_path_factory.mktemp("card")
    with pytest.MonkeyPatch.context() as mp:
        cache = use_offline_cache(mp, tmp)
        base = tiny_3dpe_pt(tmp / "src" / "3dpe.pt")
        commit = add_to_cache(cache, "threedpe-test/base", {"3dpe.pt": base})
        data = make_tiny_dataset(tmp / "data", n_portraits=4)
        (data / "datagen_config.yaml").write_text(
            "source: {kind: eg3d, network: pretrained_models/ffhqrebalanced512-128.pkl}\n"
            "edit: {model: timbrooks/instruct-pix2pix}\n"
            "filter: {enabled: true, clip_model: ViT-B-16, min_directional: 0.21, min_image_similarity: 0.65}\n")
        res = main(tiny_config(data, tmp / "exps", "cardrun", "max_steps=2", "log.save_interval=2",
                               "export_3dpe=false", "model.student_checkpoint=threedpe-test/base/3dpe.pt"))
    return {"run_dir": res.run_dir, "base": base, "commit": commit, "train_pairs": 6}


def test_training_card_metadata_and_hashes(trained):
    for folder in (trained["run_dir"] / "final", trained["run_dir"] / "checkpoints" / "step_00000002"):
        card = read_model_card(folder)
        meta = card["metadata"]
        assert meta["license"] == "cc-by-nc-sa-4.0" and "license_name" not in meta
        assert meta["library_name"] == "threedpe" and "threedpe" in meta["tags"]
        assert meta["base_model"] == ["threedpe-test/base"]
        facts = meta["threedpe"]
        assert facts["model_type"] == "3dpe" and facts["steps"] == 2
        (base,) = facts["base_checkpoints"]
        assert base == {"role": "student_checkpoint", "source": "threedpe-test/base/3dpe.pt",
                        "repo_id": "threedpe-test/base", "revision": trained["commit"], "file": "3dpe.pt",
                        "sha256": sha256(trained["base"])}
        data = facts["data"]
        assert data["pairs"] == trained["train_pairs"] and data["portraits"] == 3
        assert data["filter"] == {"clip_model": "ViT-B-16", "min_directional": 0.21, "min_image_similarity": 0.65}
        assert data["generated_by"]["network"] == "pretrained_models/ffhqrebalanced512-128.pkl"
        assert "student_checkpoint: threedpe-test/base/3dpe.pt" in card["sections"]["Training"]
        assert "Steps trained: 2." in card["sections"]["Training"]
        assert "3DPE checkpoint" in card["sections"]["Licence"]  # the reason is given
        assert {"Licence", "Base checkpoints", "Training", "Data", "Files"} <= set(card["sections"])
        assert "Evaluation" not in card["sections"] and "model-index" not in meta  # nothing was measured
        assert assert_hub_parses(folder)["license"] == "cc-by-nc-sa-4.0"
        assert no_placeholders(folder)
    # the snapshot still loads (the card is an extra file)
    assert ck.load_checkpoint(trained["run_dir"] / "final").model_type == "3dpe"


def test_card_leaves_out_what_is_unknown(tmp_path):
    write_model_card(tmp_path, model_type="3dpe", licence=None, base_checkpoints={"init_checkpoint": ""},
                     training_config=None, data=None, steps=None, evaluation={"mean": {"lpips": None}})
    card = read_model_card(tmp_path)
    assert not {"license", "license_name", "base_model", "model-index"} & set(card["metadata"])
    assert card["metadata"]["threedpe"] == {"model_type": "3dpe"}
    assert not {"Base checkpoints", "Training", "Data", "Evaluation"} & set(card["sections"])
    assert "No licence is declared" in card["sections"]["Licence"]
    assert no_placeholders(tmp_path)
    assert_hub_parses(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# the converter
# ------------------------------------------------------------------------------------------------------------
def test_converter_cards(tmp_path, monkeypatch, tiny_original_architectures):
    from models.eg3d.config import GeneratorConfig
    from models.eg3d.generator import TriPlaneGenerator
    from tools.convert_checkpoint import main

    pt = tiny_3dpe_pt(tmp_path / "3dpe.pt")
    assert main([str(pt), str(tmp_path / "proj")]) == 0
    meta = read_model_card(tmp_path / "proj")["metadata"]
    assert meta["license"] == "cc-by-nc-sa-4.0" and "base_model" not in meta
    (base,) = meta["threedpe"]["base_checkpoints"]
    assert base["sha256"] == sha256(pt) and base["file"] == "3dpe.pt" and base["role"] == "converted from"
    assert meta["threedpe"]["steps"] == 120000
    assert_hub_parses(tmp_path / "proj")

    g = TriPlaneGenerator(GeneratorConfig.tiny())
    pth = ck.write_eg3d_pth(tmp_path / "eg3d.pth", g.state_dict(), *ck.eg3d_kwargs_from_config(g.config))
    assert main([str(pth), str(tmp_path / "eg3d")]) == 0
    card = read_model_card(tmp_path / "eg3d")
    meta = card["metadata"]
    assert (meta["license"], meta["license_name"]) == ("other", "nvidia-source-code-license")
    assert meta["license_link"].startswith("https://") and "NVIDIA" in card["sections"]["Licence"]
    assert meta["threedpe"]["base_checkpoints"][0]["sha256"] == sha256(pth)
    assert "steps" not in meta["threedpe"]  # an EG3D .pth records none
    assert_hub_parses(tmp_path / "eg3d")

    # from a Hub id; a project folder's copy inherits its licence
    monkeypatch.chdir(tmp_path)
    cache = use_offline_cache(monkeypatch, tmp_path)
    commit = add_to_cache(cache, "threedpe-test/orig", {"3dpe.pt": pt})
    assert main(["threedpe-test/orig/3dpe.pt", str(tmp_path / "from_hub")]) == 0
    meta = read_model_card(tmp_path / "from_hub")["metadata"]
    assert meta["base_model"] == ["threedpe-test/orig"]
    assert meta["threedpe"]["base_checkpoints"][0]["revision"] == commit
    assert meta["threedpe"]["base_checkpoints"][0]["sha256"] == sha256(pt)
    assert main([str(tmp_path / "eg3d"), str(tmp_path / "eg3d_copy")]) == 0
    meta = read_model_card(tmp_path / "eg3d_copy")["metadata"]
    assert meta["license_name"] == "nvidia-source-code-license"
    assert meta["threedpe"]["base_checkpoints"][0]["sha256"] == sha256(tmp_path / "eg3d" / "model.safetensors")
    assert meta["threedpe"]["base_checkpoints"][0]["file"] == "model.safetensors"


# ------------------------------------------------------------------------------------------------------------
# the evaluator
# ------------------------------------------------------------------------------------------------------------
def test_evaluate_puts_its_figures_in_the_card(tmp_path, monkeypatch, tiny_original_architectures):
    from tools import evaluate
    from tools.convert_checkpoint import main as convert

    assert convert([str(tiny_3dpe_pt(tmp_path / "3dpe.pt")), str(tmp_path / "proj")]) == 0
    rng = np.random.default_rng(0)
    for sub in ("input", "ref"):
        (tmp_path / "imgs" / sub).mkdir(parents=True)
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / sub / "a.png")
    # only LPIPS is available: the card must report it and nothing else
    monkeypatch.setattr(evaluate.Evaluator, "from_files", classmethod(lambda cls, *a, **k: cls(
        lpips=lambda x, y: (x - y).abs().mean(dim=(1, 2, 3)), reasons={"clip": "no weights", "identity": "none"})))
    rc = evaluate.main(["--checkpoint", str(tmp_path / "proj"), "--results", str(tmp_path / "res"),
                        "--data-dir", str(tmp_path / "imgs"), "--device", "cpu"])
    assert rc == 0
    measured = json.loads((tmp_path / "res" / "metrics.json").read_text())
    card = read_model_card(tmp_path / "proj")
    (index,) = card["metadata"]["model-index"]
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics["lpips"] == pytest.approx(measured["mean"]["lpips"])
    assert not {"clip_directional", "identity", "clip_image_text"} & set(metrics)
    assert "LPIPS" in card["sections"]["Evaluation"] and "CLIP" not in card["sections"]["Evaluation"]
    assert card["metadata"]["license"] == "cc-by-nc-sa-4.0"  # the rest of the card is kept
    assert "Base checkpoints" in card["sections"]
    assert no_placeholders(tmp_path / "proj")
    assert_hub_parses(tmp_path / "proj")


def test_card_evaluation_leaves_out_strings(tmp_path):
    """Metrics reported as "unavailable" / "not applicable" never reach the card as values."""
    from models.checkpoint.model_card import _set_evaluation

    card = {"metadata": {}, "sections": {}, "title": "t"}
    _set_evaluation(card, {"mean": {"lpips": 0.25, "identity": "unavailable", "clip_direction": "not applicable"},
                           "runtime_seconds_per_edit": "unavailable", "count": 2, "data": "imgs"})
    text = card["sections"]["Evaluation"]
    assert "0.25" in text and "unavailable" not in text and "not applicable" not in text
    assert "seconds per edit" not in text
