"""InstructPix2PixEditor on a tiny random pipeline: shapes, range, per-sample seeding, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.instruct_pix2pix import (InstructPix2PixConfig, InstructPix2PixEditor, build_clip_tokenizer,
                                       build_tiny_instruct_pix2pix)
from utils.errors import BadImageError, MissingWeightsError


@pytest.fixture(scope="module")
def editor() -> InstructPix2PixEditor:
    pipe = build_tiny_instruct_pix2pix(seed=0)
    return InstructPix2PixEditor.from_pipeline(pipe, InstructPix2PixConfig(resolution=64, steps=2, batch_size=4))


def _images(n: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_tokenizer_matches_clip_ids():
    tok = build_clip_tokenizer()
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(tok) == 49408
    assert tok.pad_token_id == 49407


def test_edit_batch_shape_range_and_seeds(editor):
    x = _images(2)
    y = editor(x, ["make it red", "make it blue"], seeds=[1, 2])
    assert y.shape == (2, 3, 64, 64) and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1 and y.std() > 0.01
    # Same seeds → same result whatever the batch order or batch size.
    swapped = editor(x.flip(0), ["make it blue", "make it red"], seeds=[2, 1])
    torch.testing.assert_close(swapped.flip(0), y, atol=1e-4, rtol=0)
    single = editor(x[1:], "make it blue", seeds=[2])
    torch.testing.assert_close(single[0], y[1], atol=1e-4, rtol=0)
    one_per_call = InstructPix2PixEditor.from_pipeline(
        editor.pipe, InstructPix2PixConfig(resolution=64, steps=2, batch_size=1))
    torch.testing.assert_close(one_per_call(x, ["make it red", "make it blue"], seeds=[1, 2]), y, atol=1e-4, rtol=0)
    # Different seeds → different results.
    other = editor(x, ["make it red", "make it blue"], seeds=[7, 8])
    assert (other - y).abs().mean() > 1e-3
    # Call overrides change the sampling.
    fewer = editor(x, ["make it red", "make it blue"], seeds=[1, 2], steps=1, guidance_scale=3.0)
    assert (fewer - y).abs().mean() > 1e-3


def test_default_seed_and_resize(editor):
    x = _images(1, size=48)  # not the working resolution: edited at 64, returned at 48
    y = editor(x, "make it red")
    assert y.shape == (1, 3, 48, 48)
    torch.testing.assert_close(editor(x, ["make it red"], seeds=[0]), y)


def test_pil_input(editor):
    arr = ((_images(1)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    pil = [Image.fromarray(arr), Image.fromarray(arr)]
    y = editor(pil, "make it red", seeds=[4, 4])
    assert y.shape == (2, 3, 64, 64)
    torch.testing.assert_close(y[0], y[1])
    with pytest.raises(BadImageError):
        editor([Image.fromarray(arr), Image.fromarray(arr[:32])], "x")
    with pytest.raises(ValueError):
        editor(_images(2), ["a", "b", "c"])


def test_missing_model_folder(tmp_path):
    with pytest.raises(MissingWeightsError, match="instruct-pix2pix"):
        InstructPix2PixEditor(InstructPix2PixConfig(model=str(tmp_path / "nowhere")), device="cpu")


def test_bridge_checks_without_loading_and_does_not_retry(tmp_path, monkeypatch):
    """The weights are found (or not) without loading them, and a failed load is not retried per input."""
    import huggingface_hub.constants

    import pipelines.instruct_pix2pix as ip2p

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no pretrained_models/instruct-pix2pix here
    bridge = ip2p.LazyInstructPix2Pix(ip2p.InstructPix2PixConfig(), device="cpu")
    with pytest.raises(ip2p.InstructPix2PixMissingError) as info:
        bridge.check()
    msg = str(info.value)
    assert "'pretrained_models/instruct-pix2pix'" in msg and "--ip2p-model PATH" in msg and "\n" not in msg
    assert f"`{ip2p.DOWNLOAD_COMMAND}`" in msg and ip2p.DOWNLOAD_COMMAND.startswith("hf download ")
    checks = []
    real = ip2p.check_instruct_pix2pix
    monkeypatch.setattr(ip2p, "check_instruct_pix2pix", lambda *a, **k: checks.append(1) or real(*a, **k))
    for _ in range(3):
        with pytest.raises(MissingWeightsError):
            bridge(torch.zeros(1, 3, 8, 8), ["x"])
    assert len(checks) == 1
    # the default folder, once there, is used (a folder given with --ip2p-model too)
    folder = tmp_path / ip2p.DEFAULT_LOCAL_FOLDER
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert ip2p.LazyInstructPix2Pix(ip2p.InstructPix2PixConfig()).check() == ip2p.DEFAULT_LOCAL_FOLDER
    assert ip2p.check_instruct_pix2pix(ip2p.InstructPix2PixConfig(model=str(folder))) == str(folder)
    empty = tmp_path / "partial"
    empty.mkdir()
    with pytest.raises(ip2p.InstructPix2PixMissingError, match="has no model_index.json"):
        ip2p.check_instruct_pix2pix(ip2p.InstructPix2PixConfig(model=str(empty)))
