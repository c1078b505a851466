"""ClipScorer with a tiny random open_clip: shapes, identities and invariances of the scores."""
from __future__ import annotations

import pytest
import torch

from models.editing.clip_prompt import build_open_clip, tiny_open_clip_config
from pipelines.clip_scores import ClipScorer
from utils.errors import MissingWeightsError


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_open_clip(model_cfg=tiny_open_clip_config(width=32, image_size=32, embed_dim=16))
    return ClipScorer.from_model(model, device="cpu", batch_size=2)


def _images(n: int, seed: int, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_embeddings_shapes_and_norm(scorer):
    e = scorer.image_embeddings(_images(5, 0))  # 5 > batch_size: chunked
    t = scorer.text_embeddings(["a man", "a woman", "a zombie"])
    assert e.shape == (5, 16) and t.shape == (3, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    # Chunking does not change results.
    torch.testing.assert_close(scorer.image_embeddings(_images(5, 0)[3:]), e[3:], atol=1e-5, rtol=1e-5)


def test_image_similarity(scorer):
    a, b = _images(3, 1), _images(3, 2)
    s = scorer.image_similarity(a, a)
    assert s.shape == (3,)
    torch.testing.assert_close(s, torch.ones(3), atol=1e-5, rtol=0)
    d = scorer.image_similarity(a, b)
    assert torch.all(d < 1 - 1e-4) and torch.all(d >= -1)
    torch.testing.assert_close(scorer.image_similarity(b, a), d)


def test_image_text_similarity(scorer):
    imgs = _images(2, 3)
    s = scorer.image_text_similarity(imgs, "a photo of a face")
    assert s.shape == (2,)
    e, t = scorer.image_embeddings(imgs), scorer.text_embeddings(["a photo of a face"])
    torch.testing.assert_close(s, (e @ t.T)[:, 0])
    with pytest.raises(ValueError):
        scorer.image_text_similarity(imgs, ["a", "b", "c"])


def test_directional_similarity_invariances(scorer):
    src, edit = _images(3, 4), _images(3, 5)
    s = scorer.directional_similarity(src, edit, "a man", "a zombie")
    assert s.shape == (3,) and torch.all(s.abs() <= 1)
    # Swapping the images flips the sign; swapping both images and texts leaves it unchanged.
    torch.testing.assert_close(scorer.directional_similarity(edit, src, "a man", "a zombie"), -s, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.directional_similarity(edit, src, "a zombie", "a man"), s, atol=1e-5, rtol=0)
    # Per-sample: batch order does not matter; texts broadcast like lists.
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(scorer.directional_similarity(src[perm], edit[perm], ["a man"] * 3, ["a zombie"] * 3),
                               s[perm], atol=1e-5, rtol=0)
    # No image change, or no text change → 0.
    torch.testing.assert_close(scorer.directional_similarity(src, src, "a man", "a zombie"), torch.zeros(3))
    torch.testing.assert_close(scorer.directional_similarity(src, edit, "a man", "a man"), torch.zeros(3))
    # An edit that moves exactly along the text direction scores 1 (checked on embeddings).
    d_txt = scorer.text_direction("a man", "a zombie", 1)
    d_img = scorer.image_embeddings(edit[:1]) - scorer.image_embeddings(src[:1])
    manual = torch.nn.functional.cosine_similarity(d_img, d_txt)
    torch.testing.assert_close(manual, s[:1], atol=1e-5, rtol=0)


def test_image_direction(scorer):
    src, ref, edit = _images(2, 6), _images(2, 7), _images(2, 8)
    d = scorer.direction_from_images(src, ref)
    assert d.shape == (2, 16)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.direction_from_images(src, src), torch.zeros(2, 16))
    # An edit that reaches the reference scores 1; one that goes back to the source scores 0.
    torch.testing.assert_close(scorer.image_directional_similarity(src, ref, ref), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.image_directional_similarity(src, src, ref), torch.zeros(2))
    s = scorer.image_directional_similarity(src, edit, ref)
    assert s.shape == (2,) and torch.all(s.abs() <= 1)


def test_default_weights_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained_models/ here
    with pytest.raises(MissingWeightsError, match="open_clip_vit_b16.bin"):
        ClipScorer()
