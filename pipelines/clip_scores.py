"""CLIP scores for edits: data-generation filtering (drop failed InstructPix2Pix edits) and evaluation.

All embeddings are L2-normalised; every score is per sample (shape N). Directions are differences of
normalised embeddings (the CLIP directional similarity of StyleGAN-NADA / InstructPix2Pix):

    scorer = ClipScorer()                                  # pretrained_models/open_clip_vit_b16.bin
    keep = scorer.directional_similarity(src, edited, ["a photo of a man"], ["a photo of a zombie"]) > 0.2
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.editing.clip_prompt import DEFAULT_CLIP_WEIGHTS, build_open_clip, clip_preprocess, clip_tokenizer
from utils.batching import broadcast_list
from utils.device import resolve_device


class ClipScorer:
    """open_clip model in eval mode for scoring images against images and texts.

    pretrained: a local open_clip checkpoint file/folder or an open_clip tag. None means the project's default
    file `pretrained_models/open_clip_vit_b16.bin` (MissingWeightsError, saying where to get it, when absent).
    Use `from_model` for a model you built yourself (tests use a tiny random one).
    """

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = None,
                 device: str | torch.device | None = None, batch_size: int = 32):
        model = build_open_clip(model_name, pretrained or DEFAULT_CLIP_WEIGHTS)
        self._setup(model, device, batch_size, model_name)

    @classmethod
    def from_model(cls, model: nn.Module, device: str | torch.device | None = None, batch_size: int = 32,
                   model_name: str = "ViT-B-16") -> "ClipScorer":
        """Wrap an open_clip CLIP model (e.g. `build_open_clip(model_cfg=tiny_open_clip_config())`)."""
        self = cls.__new__(cls)
        self._setup(model, device, batch_size, model_name)
        return self

    def _setup(self, model: nn.Module, device, batch_size: int, model_name: str) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.tokenizer = clip_tokenizer(model_name, int(model.context_length))
        self.batch_size = int(batch_size)

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images N×3×H×W in [-1,1] → N×D unit vectors (float32, on the scorer's device)."""
        out = []
        for chunk in images.split(self.batch_size):
            x = clip_preprocess(chunk.to(self.device), self.image_size)
            out.append(self.model.encode_image(x, normalize=True).float())
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str] | str) -> torch.Tensor:
        """N texts → N×D unit vectors."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(ids, normalize=True).float())
        return torch.cat(out)

    def image_similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine between the CLIP embeddings of a[i] and b[i]: N in [-1,1] (identical images → 1)."""
        return (self.image_embeddings(a) * self.image_embeddings(b)).sum(-1).clamp(-1, 1)

    def image_text_similarity(self, images: torch.Tensor, texts: Sequence[str] | str) -> torch.Tensor:
        """Cosine between image i and text i (one text is broadcast): N in [-1,1]."""
        texts = broadcast_list(texts, images.shape[0], "texts")
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).clamp(-1, 1)

    def text_direction(self, src_texts: Sequence[str] | str, tgt_texts: Sequence[str] | str, n: int) -> torch.Tensor:
        """T(tgt) - T(src) for n samples (texts broadcast): N×D, not normalised."""
        return self.text_embeddings(broadcast_list(tgt_texts, n, "texts")) - self.text_embeddings(broadcast_list(src_texts, n, "texts"))

    def directional_similarity(self, src_images: torch.Tensor, edit_images: torch.Tensor,
                               src_texts: Sequence[str] | str, tgt_texts: Sequence[str] | str) -> torch.Tensor:
        """cos(E(edit) - E(src), T(tgt) - T(src)): N in [-1,1]; 0 when either change is zero."""
        d_img = self.image_embeddings(edit_images) - self.image_embeddings(src_images)
        d_txt = self.text_direction(src_texts, tgt_texts, src_images.shape[0])
        return F.cosine_similarity(d_img, d_txt, dim=-1, eps=1e-8)

    def direction_from_images(self, src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Image-prompt edit direction E(ref) - E(src), normalised: N×D (zero where ref == src)."""
        d = self.image_embeddings(ref) - self.image_embeddings(src)
        return F.normalize(d, dim=-1, eps=1e-8)

    def image_directional_similarity(self, src: torch.Tensor, edit: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """cos(E(edit) - E(src), E(ref) - E(src)) for image-prompt edits: N in [-1,1]."""
        e_src = self.image_embeddings(src)
        return F.cosine_similarity(self.image_embeddings(edit) - e_src, self.image_embeddings(ref) - e_src,
                                   dim=-1, eps=1e-8)
