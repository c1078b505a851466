"""CLIP prompt encoder: image and text prompts → tokens for the editing encoder's cross-attention.

The released 3DPE code encodes a reference image with an MAE ViT-B/16 (197×768 tokens). This module is
the project's alternative prompt branch: open_clip's two towers (frozen by default) give per-token features
of an image (class + patch tokens after `ln_post`) or of a text (per-token features after `ln_final`), and one
learned linear projection per tower maps them to `token_dim` (768, the width of the fuser's cross-attention).

Every encode returns `(tokens N×T×token_dim, bias N×T)`. `bias` is added to the attention logits by the fuser:
0 for a token that takes part, -inf for a padding token, and log(weight) for a weighted image/text mix.

The open_clip helpers here (`build_open_clip`, `load_open_clip_weights`, `clip_preprocess`, `clip_tokenizer`)
are the one place that builds CLIP models; `pipelines.clip_scores` uses them too.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint.hub import resolve_weights
from utils.errors import ConfigError, MissingWeightsError

logger = logging.getLogger(__name__)

# Where users put the CLIP weights, and where they get them.
DEFAULT_CLIP_WEIGHTS = "pretrained_models/open_clip_vit_b16.bin"
CLIP_WEIGHTS_URL = (
    "https://huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K "
    "(file open_clip_pytorch_model.bin; or open_clip tag 'laion2b_s34b_b88k' when online)"
)
# File names open_clip uses inside a downloaded Hugging Face folder.
_FOLDER_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
# CLIP's pixel statistics (OpenAI / LAION ViT-B models), in [0,1] RGB units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_open_clip_config(
    width: int = 32, layers: int = 1, heads: int = 2, image_size: int = 32, patch_size: int = 8,
    context_length: int = 16, embed_dim: int = 16,
) -> dict[str, Any]:
    """An open_clip model config dict for a tiny CLIP (tests, benchmarks). Keeps CLIP's BPE vocabulary size."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": width // heads},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": heads,
                     "layers": layers},
    }


@dataclass
class ClipPromptConfig:
    """Options of `ClipPromptEncoder`.

    model_name: an open_clip built-in architecture ('ViT-B-16').
    pretrained: a local open_clip checkpoint file, a folder holding one (a Hugging Face download), or an
        open_clip pretrained tag (needs the network or the HF cache). None builds random towers: use it when
        the weights come later from a project checkpoint that holds the whole editing encoder.
    token_dim: width of the output tokens (the fuser's attention width).
    image_size: side the prompt image is resized to (None: the model's own input size).
    freeze_towers: the CLIP towers get no gradient and stay in eval mode; only the projections train.
    model_cfg: a full open_clip model config dict that replaces `model_name`'s (tiny test models).
    context_length: text context length override (None: the model's, 77 for ViT-B-16).
    """

    model_name: str = "ViT-B-16"
    pretrained: str | None = None
    token_dim: int = 768
    image_size: int | None = 224
    freeze_towers: bool = True
    model_cfg: dict = field(default_factory=dict)
    context_length: int | None = None


def _resolve_weight_file(model_name: str, pretrained: str) -> str:
    """A local file for `pretrained` (file, folder, or tag); MissingWeightsError when none can be had."""
    import open_clip

    path = resolve_weights(Path(pretrained).expanduser(), files=_FOLDER_WEIGHT_NAMES)  # a Hub id → its cached file
    if path.is_file():
        return str(path)
    if path.is_dir():
        for name in _FOLDER_WEIGHT_NAMES:
            if (path / name).is_file():
                return str(path / name)
        raise MissingWeightsError(
            str(path / _FOLDER_WEIGHT_NAMES[1]), f"open_clip {model_name} weights in folder", CLIP_WEIGHTS_URL)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        try:
            return open_clip.download_pretrained(tag_cfg)
        except Exception as e:  # offline, no cache, network error: all mean "provide the file"
            raise MissingWeightsError(
                DEFAULT_CLIP_WEIGHTS, f"open_clip {model_name} weights (tag '{pretrained}' could not be "
                f"downloaded: {type(e).__name__})", CLIP_WEIGHTS_URL) from e
    raise MissingWeightsError(str(path), f"open_clip {model_name} weights", CLIP_WEIGHTS_URL)


def load_open_clip_weights(model: nn.Module, model_name: str, pretrained: str) -> str:
    """Load `pretrained` (file, folder or tag) into an open_clip model in place; returns the file used."""
    import open_clip

    weight_file = _resolve_weight_file(model_name, pretrained)
    open_clip.load_checkpoint(model, weight_file, strict=True, weights_only=True)
    return weight_file


def build_open_clip(
    model_name: str = "ViT-B-16", pretrained: str | None = None, model_cfg: dict | None = None,
    context_length: int | None = None,
) -> nn.Module:
    """An open_clip CLIP model, built with random weights, then loaded from local `pretrained` if given.

    model_cfg: a full open_clip config dict replacing `model_name`'s (e.g. `tiny_open_clip_config()`).
    Never downloads base tower weights; only an explicit pretrained tag may touch the network.
    """
    import open_clip

    if model_cfg:
        cfg = copy.deepcopy(dict(model_cfg))
    else:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ConfigError(f"unknown open_clip model '{model_name}' (e.g. 'ViT-B-16'; see open_clip.list_models())")
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = int(context_length)
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}) \
            or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ConfigError(f"open_clip model '{model_name}': only native ViT towers (open_clip.CLIP) are supported")
    weight_file = _resolve_weight_file(model_name, pretrained) if pretrained else None  # fail before building
    if pretrained and not model_cfg and (open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("quick_gelu"):
        cfg["quick_gelu"] = True  # e.g. the 'openai' tags were trained with QuickGELU
    model = open_clip.model.CLIP(**cfg)
    model.eval()
    if weight_file:
        open_clip.load_checkpoint(model, weight_file, strict=True, weights_only=True)
        logger.info("loaded open_clip %s weights from %s", model_name, weight_file)
    return model


def clip_tokenizer(model_name: str = "ViT-B-16", context_length: int = 77):
    """open_clip's BPE tokenizer (its vocabulary ships with the package: works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def clip_preprocess(
    images: torch.Tensor, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP input from images N×3×H×W in [-1,1]: bicubic resize of the short side to `image_size`, centre crop,
    CLIP mean/std. Returns N×3×image_size×image_size (normalised, roughly in [-2,2])."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images N×3×H×W, got {tuple(images.shape)}")
    x = (images.float().clamp(-1, 1) + 1) * 0.5
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        x = x[..., top:top + image_size, left:left + image_size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _model_image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ClipPromptEncoder(nn.Module):
    """open_clip towers + learned projections → prompt tokens.

    Children: `clip` (open_clip.CLIP), `image_proj` (Linear vision width → token_dim),
    `text_proj` (Linear text width → token_dim). For ViT-B-16: image tokens 197×768 (class + 14×14 patches),
    text tokens 77×512 before projection.
    """

    def __init__(self, cfg: ClipPromptConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or ClipPromptConfig()
        self.clip = build_open_clip(cfg.model_name, cfg.pretrained, cfg.model_cfg or None, cfg.context_length)
        self.image_size = int(cfg.image_size or _model_image_size(self.clip))
        if self.image_size != _model_image_size(self.clip):
            raise ConfigError(f"clip image_size {self.image_size} != the model's input size "
                              f"{_model_image_size(self.clip)}")
        self.context_length = int(self.clip.context_length)
        self.tokenizer = clip_tokenizer(cfg.model_name, self.context_length)
        vision_width = self.clip.visual.conv1.out_channels
        text_width = self.clip.token_embedding.embedding_dim
        self.image_proj = nn.Linear(vision_width, cfg.token_dim)
        self.text_proj = nn.Linear(text_width, cfg.token_dim)
        for proj in (self.image_proj, self.text_proj):
            # Norm-preserving start: the parameter-free attention sees features at CLIP's own scale.
            nn.init.orthogonal_(proj.weight)
            nn.init.zeros_(proj.bias)
        if cfg.freeze_towers:
            self.clip.requires_grad_(False)
            self.clip.eval()

    @property
    def num_image_tokens(self) -> int:
        grid = self.clip.visual.grid_size
        return int(grid[0] * grid[1]) + 1

    def train(self, mode: bool = True) -> "ClipPromptEncoder":
        super().train(mode)
        if self.config.freeze_towers:
            self.clip.eval()
        return self

    def _device(self) -> torch.device:
        return self.image_proj.weight.device

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids N×L (int64, L = context length; 0 = padding) and the EOT position N (int64)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer(list(texts)).to(self._device())
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=1)
        return ids, eot

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Vision tower tokens after `ln_post`, before pooling: N×(1+grid²)×width (class token first)."""
        x = clip_preprocess(images.to(self._device()), self.image_size)
        x = x.to(self.clip.visual.conv1.weight.dtype)
        out = self.clip.visual.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC",
            output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Text tower per-token features after `ln_final` (causal: token i sees 0..i): N×L×width."""
        out = self.clip.forward_intermediates(
            text=ids, text_indices=1, normalize_intermediates=True, intermediates_only=True)
        return out["text_intermediates"][-1]

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images N×3×H×W in [-1,1] → tokens N×T×token_dim (T = 197 for ViT-B-16), bias N×T of zeros."""
        feats = self.image_features(images)
        tokens = self.image_proj(feats.to(self.image_proj.weight.dtype))
        bias = tokens.new_zeros(tokens.shape[:2], dtype=torch.float32)
        return tokens, bias

    def encode_text(self, texts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (N strings) → tokens N×L×token_dim (L = context length, 77), bias N×L: 0 up to and including
        the EOT token, -inf on the padding after it."""
        ids, eot = self.tokenize(texts)
        feats = self.text_features(ids)
        tokens = self.text_proj(feats.to(self.text_proj.weight.dtype))
        pos = torch.arange(ids.shape[1], device=ids.device)
        bias = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        bias = bias.masked_fill(pos[None, :] > eot[:, None], float("-inf"))
        return tokens, bias

    def encode(
        self, images: torch.Tensor | None = None, texts: Sequence[str] | str | None = None,
        image_weight: float = 0.5,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image prompt, text prompt, or both.

        Both: the token sets are concatenated (image first: N×(T_img+L)×C) and the bias adds log(image_weight)
        to image tokens and log(1-image_weight) to text tokens, so each set's share of the attention is scaled
        by its weight (a prior: the share also depends on how well each set matches the query).
        A single text is broadcast to all N images.
        """
        if images is None and texts is None:
            raise ValueError("encode needs images, texts, or both")
        if images is None:
            return self.encode_text(texts)
        if texts is None:
            return self.encode_image(images)
        if not 0.0 <= image_weight <= 1.0:
            raise ValueError(f"image_weight must be in [0,1], got {image_weight}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = images.shape[0]
        if len(texts) == 1 and n > 1:
            texts = texts * n
        if len(texts) != n:
            raise ValueError(f"{n} images but {len(texts)} texts")
        img_tok, img_bias = self.encode_image(images)
        txt_tok, txt_bias = self.encode_text(texts)
        log_w = math.log(image_weight) if image_weight > 0 else float("-inf")
        log_1w = math.log1p(-image_weight) if image_weight < 1 else float("-inf")
        tokens = torch.cat([img_tok, txt_tok.to(img_tok.dtype)], dim=1)
        bias = torch.cat([img_bias + log_w, txt_bias + log_1w], dim=1)
        return tokens, bias

    def forward(self, images: torch.Tensor | None = None, texts: Sequence[str] | str | None = None,
                image_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as `encode`."""
        return self.encode(images, texts, image_weight)
