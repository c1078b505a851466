"""Hugging Face Hub ids for weights, resolved offline from a cache laid out as huggingface_hub lays it out."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from hf_cache import add_to_cache, use_offline_cache
from models import checkpoint as ck
from models.checkpoint.hub import HubRef, parse_hub_id, resolve_weights
from utils.errors import HubWeightsError, MissingWeightsError, UnsafePickleError


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline cache; the working directory is an empty folder (local-path rules depend on it)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return use_offline_cache(monkeypatch, tmp_path)


def tiny_project(dst: Path, seed: int) -> Path:
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(seed)
    e_cfg, r_cfg = EditingEncoderConfig.tiny(), RendererConfig.tiny()
    comps = {"encoder": EditingEncoder(e_cfg).state_dict(), "renderer": TriplaneRenderer(r_cfg).state_dict()}
    return ck.save_pretrained(dst, comps, "3dpe", {"encoder": e_cfg, "renderer": r_cfg}, {"test": seed})


def tiny_3dpe_pt(dst: Path, seed: int) -> Path:
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(seed)
    enc, ren = EditingEncoder(EditingEncoderConfig.tiny()), TriplaneRenderer(RendererConfig.tiny())
    return ck.export_original_3dpe(dst, enc.state_dict(), ren.state_dict(), step=7, opts={"batch_size": 2})


def encoder_weights(spec) -> torch.Tensor:
    return ck.load_checkpoint(spec).components["encoder"]["Final_encoder.output_net.9.weight"]


# ------------------------------------------------------------------------------------------------------------
# what reads as a Hub id
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    ("org/name", HubRef("org/name")),
    ("org/name@v1.0", HubRef("org/name", "v1.0")),
    ("org/name/3dpe.pt", HubRef("org/name", None, "3dpe.pt")),
    ("org/name@0123abc/sub/encoder_render_LT_90000.pt", HubRef("org/name", "0123abc", "sub/encoder_render_LT_90000.pt")),
    ("org/name/", HubRef("org/name")),
    ("pretrained_models/3dpe.pt", None),       # the project's weights folder: always local
    ("pretrained_models/3dpe", None),
    ("exps/run1/final", None),
    ("ckpts/3dpe.pt", None),                   # a repository name never ends like a file
    ("3dpe.pt", None),
    ("/abs/org/name", None),
    ("./org/name", None),
    ("~/org/name", None),
    ("org//name", None),
    ("org/name@", None),
    ("hf://org/name", None),
    ("org/na--me", None),                      # breaks the Hub's naming rules
    ("", None),
])
def test_parse_hub_id(spec, want, cache):
    assert parse_hub_id(spec) == want


def test_an_existing_first_folder_means_a_local_path(cache):
    Path("org").mkdir()
    assert parse_hub_id("org/name") is None
    add_to_cache(cache, "org/name", {"": tiny_project(cache.parent / "p", 0)})
    with pytest.raises(MissingWeightsError) as e:  # a missing local file, not a Hub lookup
        ck.load_checkpoint("org/name")
    assert not isinstance(e.value, HubWeightsError) and "does not exist" in str(e.value)


def test_missing_default_keeps_the_missing_file_message(cache):
    with pytest.raises(MissingWeightsError) as e:
        ck.load_checkpoint("pretrained_models/3dpe.pt")
    assert not isinstance(e.value, HubWeightsError)
    assert "Missing checkpoint: 'pretrained_models/3dpe.pt' does not exist" in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# loading through the cache
# ------------------------------------------------------------------------------------------------------------
def test_load_by_id_revision_and_file(cache):
    src = cache.parent / "src"
    a, b = tiny_project(src / "a", 1), tiny_project(src / "b", 2)
    commit_a = add_to_cache(cache, "threedpe-test/editor", {"": a})
    commit_b = add_to_cache(cache, "threedpe-test/editor", {"": b}, refs=("v2",))
    assert commit_a != commit_b
    want_a, want_b = encoder_weights(a), encoder_weights(b)
    assert not torch.equal(want_a, want_b)

    path = resolve_weights("threedpe-test/editor")
    assert path.parts[-2:] == ("snapshots", commit_a) and (path / "model.safetensors").is_file()
    assert torch.equal(encoder_weights("threedpe-test/editor"), want_a)            # main
    assert torch.equal(encoder_weights("threedpe-test/editor@v2"), want_b)         # a tag under refs/
    assert torch.equal(encoder_weights(f"threedpe-test/editor@{commit_a}"), want_a)  # a raw commit hash
    assert ck.detect_format("threedpe-test/editor@v2") == "threedpe"

    # an original-format file inside a repository, and a project folder inside one
    pt = tiny_3dpe_pt(src / "3dpe.pt", 3)
    add_to_cache(cache, "threedpe-test/originals", {"weights/3dpe.pt": pt, "editor": a})
    c = ck.load_checkpoint("threedpe-test/originals/weights/3dpe.pt")
    assert (c.format, c.meta["step"]) == ("3dpe", 7)
    assert torch.equal(c.components["encoder"]["Final_encoder.output_net.9.weight"], encoder_weights(pt))
    assert torch.equal(encoder_weights("threedpe-test/originals/editor"), want_a)


def test_local_path_wins_over_the_cache(cache):
    src = cache.parent / "src"
    add_to_cache(cache, "threedpe-test/editor", {"": tiny_project(src / "hub", 1)})
    local = tiny_project(Path("threedpe-test") / "editor", 2)  # ./threedpe-test/editor, same spelling as the id
    assert resolve_weights("threedpe-test/editor") == Path("threedpe-test/editor")
    assert torch.equal(encoder_weights("threedpe-test/editor"), encoder_weights(local))
    assert not torch.equal(encoder_weights("threedpe-test/editor"), encoder_weights(src / "hub"))


def test_uncached_id_offline_is_one_line(cache):
    with pytest.raises(HubWeightsError) as e:
        ck.load_checkpoint("threedpe-test/absent@v3")
    msg = str(e.value)
    assert isinstance(e.value, MissingWeightsError) and "\n" not in msg
    assert "no local file or folder 'threedpe-test/absent@v3'" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "`hf download threedpe-test/absent --revision v3`" in msg
    with pytest.raises(HubWeightsError, match=r"hf download threedpe-test/absent 3dpe.pt`"):
        ck.load_checkpoint("threedpe-test/absent/3dpe.pt")


def test_an_original_format_repo_needs_the_file_named(cache):
    add_to_cache(cache, "threedpe-test/originals", {"3dpe.pt": tiny_3dpe_pt(cache.parent / "3dpe.pt", 3)})
    with pytest.raises(HubWeightsError, match="not in the cache"):  # offline: config.json was never cached
        ck.load_checkpoint("threedpe-test/originals")


def test_downloaded_pickles_get_the_restricted_unpickler(cache):
    marker = cache.parent / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    add_to_cache(cache, "threedpe-test/evil", {"network.pkl": pickle.dumps({"G_ema": Evil()}, protocol=4)})
    with pytest.raises(UnsafePickleError, match="mkdir"):
        ck.load_checkpoint("threedpe-test/evil/network.pkl")
    assert not marker.exists()


def test_mae_and_open_clip_weights_by_id(cache):
    from models.editing.clip_prompt import build_open_clip, tiny_open_clip_config
    from models.editing.mae import MAEViT, MAEViTConfig, read_official_mae

    torch.manual_seed(4)
    mae = MAEViT(MAEViTConfig.tiny()).state_dict()
    torch.save({"model": mae}, cache.parent / "mae.pth")
    add_to_cache(cache, "threedpe-test/mae", {"mae_pretrain_vit_base.pth": cache.parent / "mae.pth"})
    got = read_official_mae("threedpe-test/mae")
    assert got.keys() == mae.keys() and all(torch.equal(got[k], mae[k]) for k in mae)

    clip = build_open_clip(model_cfg=tiny_open_clip_config())
    torch.save(clip.state_dict(), cache.parent / "clip.bin")
    # the second of open_clip's file names: the first is looked up in the cache and skipped
    add_to_cache(cache, "threedpe-test/clip", {"open_clip_pytorch_model.bin": cache.parent / "clip.bin"})
    loaded = build_open_clip(model_cfg=tiny_open_clip_config(), pretrained="threedpe-test/clip")
    assert torch.equal(loaded.visual.proj, clip.visual.proj)
    with pytest.raises(MissingWeightsError, match="hf download threedpe-test/clip-absent"):
        build_open_clip(model_cfg=tiny_open_clip_config(), pretrained="threedpe-test/clip-absent")


# ------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------
def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("input", "ref"):
        (root / sub).mkdir(parents=True)
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / sub / "alice.png")
    return root


def test_test_scripts_checkpoint_from_the_hub_cache(tmp_path):
    """A fresh process configured only by the environment (HF_HUB_CACHE, HF_HUB_OFFLINE) loads `org/name`."""
    cache = tmp_path / "hf" / "hub"
    add_to_cache(cache, "threedpe-test/editor", {"": tiny_project(tmp_path / "src", 1)})
    data, out = _images(tmp_path / "imgs"), tmp_path / "out"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "test_scripts.py", "--data-dir", str(data), "--output-dir", str(out), "--device", "cpu"]
    r = subprocess.run(cmd + ["--checkpoint", "threedpe-test/editor"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "alice_view0.png").is_file() and (out / "alice_mv.png").is_file()

    r = subprocess.run(cmd + ["--checkpoint", "threedpe-test/absent"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: no local file or folder 'threedpe-test/absent'")
    assert "hf download threedpe-test/absent" in lines[0]


def test_the_early_checkpoint_check_imports_no_torch(tmp_path):
    """The tools' argument layer (editor_options, the Hub-id check, the shared file names) loads without torch,
    so `--help` and 'checkpoint not found' come before any heavy import (models.checkpoint imports lazily)."""
    code = ("import argparse, sys\n"
            "from models.checkpoint import DEFAULT_CHECKPOINT\n"
            "from tools.editor_options import CheckpointNotFoundError, check_checkpoint_arg\n"
            "try:\n"
            f"    check_checkpoint_arg(argparse.Namespace(random_init=False, checkpoint={str(tmp_path / 'no.pt')!r}))\n"
            "except CheckpointNotFoundError:\n"
            "    print(DEFAULT_CHECKPOINT, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["pretrained_models/3dpe.pt", "False"]
