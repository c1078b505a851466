"""ClipPromptEncoder: image, text and mixed prompts with a tiny open_clip; weights handling."""
from __future__ import annotations

import math

import pytest
import torch

from float64 import float32_and_float64, rel_err
from models.editing.clip_prompt import (ClipPromptConfig, ClipPromptEncoder, build_open_clip, clip_preprocess,
                                        tiny_open_clip_config)
from rounding import F64_REL, forward_rel
from utils.config import from_dict
from utils.errors import MissingWeightsError

TOKEN_DIM = 24
CTX = 16
# The tiny CLIP's embeddings in float32 vs their float64 evaluation, relative to the largest |value|
# (tests/rounding.py): ≤ 8 products in a row (patch or token embedding, q/k/v, q·k, a·v, output projection, the
# MLP's two layers, the head) of ≤ 192 terms (3·8·8 patch pixels); measured ≤ 3.6e-7.
CLIP_FP32_REL = forward_rel(8, 192)  # 1.3e-5


def _cfg(**kw) -> ClipPromptConfig:
    base = dict(model_cfg=tiny_open_clip_config(width=32, image_size=32, patch_size=8, context_length=CTX),
                image_size=32, token_dim=TOKEN_DIM)
    base.update(kw)
    return ClipPromptConfig(**base)


@pytest.fixture(scope="module")
def enc() -> ClipPromptEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ClipPromptEncoder(_cfg())


def _same_maths(out32: tuple, out64: tuple) -> None:
    """Two routes to the same values: equal in float64 (F64_REL, measured ≤ 6.7e-16), and each float32 route
    within CLIP_FP32_REL of its float64 evaluation (on any CPU, whatever kernels each route gets)."""
    assert rel_err(out64[0], out64[1]) <= F64_REL
    assert all(rel_err(a, b) <= CLIP_FP32_REL for a, b in zip(out32, out64))


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_image_tokens_shape_and_bias(enc):
    tokens, bias = enc.encode_image(_images(2))
    assert tokens.shape == (2, 1 + 4 * 4, TOKEN_DIM) == (2, enc.num_image_tokens, TOKEN_DIM)
    assert bias.shape == (2, 17) and bias.dtype == torch.float32 and torch.all(bias == 0)
    assert torch.isfinite(tokens).all()


def test_image_features_are_ln_post_tokens(enc):
    # The class token of our features, projected by CLIP's own head, is CLIP's pooled image embedding.
    images = _images(3, size=32)
    _same_maths(*float32_and_float64(enc, lambda e: (
        e.image_features(images)[:, 0] @ e.clip.visual.proj, e.clip.encode_image(clip_preprocess(images, 32)))))


def test_preprocess_resizes_and_normalises():
    x = torch.zeros(2, 3, 48, 64)  # mid-grey, non-square
    y = clip_preprocess(x, 32)
    assert y.shape == (2, 3, 32, 32)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    # the constant 0.5 resized (weights summing to 1: ≤ 16 roundings), minus the mean, over std ≥ 0.26 (2 more):
    # ≤ 18·U32·0.5 / 0.26 = 2.1e-6 a side, 4.1e-6 for both ≤ 1e-5
    torch.testing.assert_close(y[0, :, 5, 7], expected, atol=1e-5, rtol=0)


def test_text_tokens_padding_masked(enc):
    texts = ["make him old", "turn the person into a marble statue with a golden crown and a red cape, in the style of a renaissance painting"]
    ids, eot = enc.tokenize(texts)
    assert ids.shape == (2, CTX) and ids.dtype == torch.int64
    assert eot[0] == 4  # SOT make him old EOT
    tokens, bias = enc.encode_text(texts)
    assert tokens.shape == (2, CTX, TOKEN_DIM) and bias.shape == (2, CTX)
    for i in range(2):
        assert torch.all(bias[i, : eot[i] + 1] == 0)
        assert torch.all(torch.isneginf(bias[i, eot[i] + 1:]))
    assert eot[1] == CTX - 1  # long text truncated: EOT forced into the last slot, nothing masked
    # The EOT feature projected by CLIP's head is CLIP's pooled text embedding.
    _same_maths(*float32_and_float64(enc, lambda e: (
        e.text_features(ids)[torch.arange(2), eot] @ e.clip.text_projection, e.clip.encode_text(ids))))


def test_text_tokens_do_not_depend_on_batch(enc):
    _same_maths(*float32_and_float64(enc, lambda e: (
        e.encode_text(["a smiling face"])[0][0],
        e.encode_text(["a much longer instruction about a smiling face", "a smiling face"])[0][1])))


def test_mixed_prompt(enc):
    images = _images(2)
    tokens, bias = enc.encode(images, "make it red", image_weight=0.25)
    assert tokens.shape == (2, 17 + CTX, TOKEN_DIM) and bias.shape == (2, 17 + CTX)
    torch.testing.assert_close(bias[:, :17], torch.full((2, 17), math.log(0.25)))
    n_valid = int(torch.isfinite(bias[0, 17:]).sum())
    assert n_valid == 5  # SOT make it red EOT ... padding masked
    torch.testing.assert_close(bias[0, 17:17 + n_valid], torch.full((n_valid,), math.log(0.75)))
    img_only, _ = enc.encode(images=images)
    torch.testing.assert_close(tokens[:, :17], img_only)
    # weight 1: the text set is masked out entirely; the image set stays.
    _, b1 = enc.encode(images, ["a", "b"], image_weight=1.0)
    assert torch.all(b1[:, :17] == 0) and torch.all(torch.isneginf(b1[:, 17:]))
    with pytest.raises(ValueError):
        enc.encode(images, ["a", "b", "c"])
    with pytest.raises(ValueError):
        enc.encode(images, "a", image_weight=1.5)
    with pytest.raises(ValueError):
        enc.encode()


def test_weights_as_attention_bias(enc):
    # The bias is meant for softmax logits: pads get zero attention, set weights scale the attention mass.
    tokens, bias = enc.encode(_images(1), "make it red", image_weight=0.5)
    q = torch.zeros(1, 5, TOKEN_DIM)  # a zero query: uniform logits, so the mass follows the bias only
    attn = torch.softmax(q @ tokens.transpose(1, 2) / math.sqrt(TOKEN_DIM) + bias[:, None], dim=-1)
    assert torch.all(attn[..., 17 + 5:] == 0)
    img_mass = attn[..., :17].sum(-1)
    # softmax over 22 logits then a sum of 17 probabilities: ≤ (22 + 17 + 2)·U32 ≈ 2.4e-6 ≤ assert_close's 1e-5
    torch.testing.assert_close(img_mass, torch.full_like(img_mass, 17 / (17 + 5)))


def test_trainable_parameters():
    enc = ClipPromptEncoder(_cfg())
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias"}
    enc.train()
    assert enc.image_proj.training and not enc.clip.training
    tokens, _ = enc.encode(_images(1), "x")
    tokens.square().mean().backward()
    assert enc.image_proj.weight.grad is not None and enc.text_proj.weight.grad.abs().sum() > 0
    open_enc = ClipPromptEncoder(_cfg(freeze_towers=False))
    assert all(p.requires_grad for p in open_enc.clip.parameters())
    open_enc.train()
    assert open_enc.clip.training


def test_local_weights_load(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        src = build_open_clip(model_cfg=_cfg().model_cfg)
    path = tmp_path / "tiny_clip.pt"
    torch.save(src.state_dict(), path)
    enc = ClipPromptEncoder(_cfg(pretrained=str(path)))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(enc.clip.state_dict()[k], v)
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save(src.state_dict(), folder / "open_clip_pytorch_model.bin")
    enc2 = ClipPromptEncoder(_cfg(pretrained=str(folder)))
    torch.testing.assert_close(enc2.clip.visual.proj, src.visual.proj)


def test_missing_weights_errors(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        ClipPromptEncoder(ClipPromptConfig(pretrained=str(tmp_path / "open_clip_vit_b16.bin")))
    msg = str(e.value)
    assert "open_clip_vit_b16.bin" in msg and "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in msg
    with pytest.raises(MissingWeightsError, match="open_clip_pytorch_model.bin"):
        ClipPromptEncoder(_cfg(pretrained=str(tmp_path)))  # a folder without weights


def test_missing_weights_tag_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    if not hf_constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE was set")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="laion2b_s34b_b88k"):
        ClipPromptEncoder(ClipPromptConfig(pretrained="laion2b_s34b_b88k"))


def test_config_from_dict():
    cfg = from_dict(ClipPromptConfig, {"token_dim": 64, "model_cfg": tiny_open_clip_config(), "image_size": 32})
    enc = ClipPromptEncoder(cfg)
    tokens, _ = enc.encode_text(["hello"])
    assert tokens.shape[-1] == 64
