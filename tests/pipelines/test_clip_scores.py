"""ClipScorer with a tiny random open_clip: shapes, identities and invariances of the scores."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from float64 import Float64Mode, rel_err, to_float64
from models.editing.clip_prompt import build_open_clip, tiny_open_clip_config
from pipelines.clip_scores import ClipScorer
from rounding import F64_REL, forward_rel
from utils.errors import MissingWeightsError

EMBED_DIM = 16
# The tiny CLIP's unit embeddings in float32 vs their float64 evaluation, per entry (tests/rounding.py): ≤ 8 products
# in a row (patch or token embedding, q/k/v, q·k, a·v, output projection, the MLP's two layers, the head) of ≤ 192
# terms (3·8·8 patch pixels), relative to the largest |entry| ≤ 1; measured ≤ 1.5e-7.
CLIP_FP32_REL = forward_rel(8, 192)  # 1.3e-5


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_open_clip(model_cfg=tiny_open_clip_config(width=32, image_size=32, embed_dim=16))
    return ClipScorer.from_model(model, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def scorer64(scorer) -> ClipScorer:
    """The same scorer in float64, to call under `Float64Mode`: invariances across batch sizes (other kernels) are
    checked there, to float64 rounding (F64_REL), not to the CPU-dependent digits of float32."""
    return ClipScorer.from_model(to_float64(copy.deepcopy(scorer.model)), device="cpu", batch_size=2)


def _images(n: int, seed: int, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_embeddings_shapes_and_norm(scorer, scorer64):
    e = scorer.image_embeddings(_images(5, 0))  # 5 > batch_size: chunked
    t = scorer.text_embeddings(["a man", "a woman", "a zombie"])
    assert e.shape == (5, EMBED_DIM) and t.shape == (3, EMBED_DIM)
    # a normalised 16-vector: ≤ 16 + 3 roundings of 1, 1.1e-6 ≤ assert_close's 1e-5
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    # Chunking does not change results (other batch sizes: other kernels, so compared in float64).
    with Float64Mode():
        e64 = scorer64.image_embeddings(_images(5, 0))
        assert rel_err(scorer64.image_embeddings(_images(5, 0)[3:]), e64[3:]) <= F64_REL  # measured 4.5e-16
    assert rel_err(e, e64) <= CLIP_FP32_REL


def test_image_similarity(scorer):
    a, b = _images(3, 1), _images(3, 2)
    s = scorer.image_similarity(a, a)
    assert s.shape == (3,)
    torch.testing.assert_close(s, torch.ones(3), atol=1e-5, rtol=0)  # |e|² of a unit 16-vector: ≤ 19·U32 = 1.1e-6
    d = scorer.image_similarity(a, b)
    assert torch.all(d < 1 - 1e-4) and torch.all(d >= -1)
    torch.testing.assert_close(scorer.image_similarity(b, a), d)


def test_image_text_similarity(scorer):
    imgs = _images(2, 3)
    s = scorer.image_text_similarity(imgs, "a photo of a face")
    assert s.shape == (2,)
    e, t = scorer.image_embeddings(imgs), scorer.text_embeddings(["a photo of a face"])
    # the same embeddings, two orders of a 16-term dot product of unit vectors: ≤ 2·γ_16 = 1.9e-6 ≤ 1e-5
    torch.testing.assert_close(s, (e @ t.T)[:, 0])
    with pytest.raises(ValueError):
        scorer.image_text_similarity(imgs, ["a", "b", "c"])


def _cosine_fp32_tol(*directions64: torch.Tensor) -> float:
    """The float32 error of a cosine between differences of unit embeddings (float64 values `directions64`): each
    embedding is off by ≤ √D·CLIP_FP32_REL in norm, a difference by twice that, and the cosine by the direction's
    relative error, for each of the two directions."""
    shortest = min(float(d.norm(dim=-1).min()) for d in directions64)
    return 2 * 2 * math.sqrt(EMBED_DIM) * CLIP_FP32_REL / shortest


def test_directional_similarity_invariances(scorer, scorer64):
    src, edit = _images(3, 4), _images(3, 5)
    s = scorer.directional_similarity(src, edit, "a man", "a zombie")
    assert s.shape == (3,) and torch.all(s.abs() <= 1)
    # Swapping the images flips the sign; swapping both images and texts leaves it unchanged (exact: the same
    # embeddings, negated differences; measured 0).
    torch.testing.assert_close(scorer.directional_similarity(edit, src, "a man", "a zombie"), -s, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.directional_similarity(edit, src, "a zombie", "a man"), s, atol=1e-5, rtol=0)
    # No image change, or no text change → 0.
    torch.testing.assert_close(scorer.directional_similarity(src, src, "a man", "a zombie"), torch.zeros(3))
    torch.testing.assert_close(scorer.directional_similarity(src, edit, "a man", "a man"), torch.zeros(3))
    # Other batch orders and sizes (other kernels) are compared in float64.
    with Float64Mode():
        s64 = scorer64.directional_similarity(src, edit, "a man", "a zombie")
        # Per-sample: batch order does not matter; texts broadcast like lists.
        perm = torch.tensor([2, 0, 1])
        shuffled = scorer64.directional_similarity(src[perm], edit[perm], ["a man"] * 3, ["a zombie"] * 3)
        assert (shuffled - s64[perm]).abs().max() <= F64_REL  # measured 5.3e-16
        # An edit that moves exactly along the text direction scores 1 (checked on embeddings).
        d_txt = scorer64.text_direction("a man", "a zombie", 1)
        d_img = scorer64.image_embeddings(edit[:1]) - scorer64.image_embeddings(src[:1])
        manual = torch.nn.functional.cosine_similarity(d_img, d_txt)
        assert (manual - s64[:1]).abs().max() <= F64_REL  # measured 3.3e-16
        d_all = scorer64.image_embeddings(edit) - scorer64.image_embeddings(src)
    tol = _cosine_fp32_tol(d_all, d_txt)
    assert (s.double() - s64).abs().max() <= tol, tol  # 4.0e-3 here (‖d_img‖ ≥ 0.05); measured 4.4e-7


def test_image_direction(scorer):
    src, ref, edit = _images(2, 6), _images(2, 7), _images(2, 8)
    d = scorer.direction_from_images(src, ref)
    assert d.shape == (2, EMBED_DIM)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)  # normalised: ≤ 19·U32 = 1.1e-6
    torch.testing.assert_close(scorer.direction_from_images(src, src), torch.zeros(2, 16))
    # An edit that reaches the reference scores 1; one that goes back to the source scores 0.
    # cos(d, d): ≤ 2·19·U32 = 2.3e-6 (measured 0)
    torch.testing.assert_close(scorer.image_directional_similarity(src, ref, ref), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.image_directional_similarity(src, src, ref), torch.zeros(2))
    s = scorer.image_directional_similarity(src, edit, ref)
    assert s.shape == (2,) and torch.all(s.abs() <= 1)


def test_default_weights_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained_models/ here
    with pytest.raises(MissingWeightsError, match="open_clip_vit_b16.bin"):
        ClipScorer()
