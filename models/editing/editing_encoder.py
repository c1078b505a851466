"""The 3DPE editing encoder: Live3D LT + a prompt branch fused into E_high by cross-attention.

    image N×3×H×W [-1,1] → Live3D features (f, high) ─┐
    prompt → tokens N×T×C (once; shareable by the batch) ─► Ref_encoder(high, tokens) → high'
    Final_encoder(high', f) → triplane N×96×H/2×W/2

Submodules `encoder`, `decoder`, `F_encoder`, `EHigh_encoder`, `Final_encoder`, `Ref_encoder`, in that
order: with the default MAE config `state_dict()` equals the `encoder_state_dict` of the released 3dpe.pt
(327 entries). Trained in the original: `Final_encoder` and `Ref_encoder`; the rest comes from Live3D LT.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from models.editing.clip_prompt import ClipPromptConfig
from models.editing.fuser import CrossAttentionFuser
from models.editing.mae import MAEViT, MAEViTConfig
from models.live3d.encoder import Live3DConfig, Live3DTrunk
from utils.config import check_choices
from utils.errors import ConfigError, UnknownCheckpointFormatError

PromptEncoderKind = Literal["mae", "clip"]
PROMPT_ENCODERS: tuple[str, ...] = typing.get_args(PromptEncoderKind)


@dataclass
class EditingEncoderConfig:
    """Architecture of the editing encoder (defaults = the released 3DPE).

    live3d: the Live3D part (mode must be 'LT').
    prompt_encoder: 'mae' (reference images; the released model) or 'clip' (images and texts).
    mae: the MAE tower (its embed_dim must equal token_dim).
    clip: the CLIP tower (used when prompt_encoder is 'clip'); its token_dim is always this config's.
    token_dim: the cross-attention width; fuser_channels: the fuser's pre_conv width.
    """

    live3d: Live3DConfig = field(default_factory=Live3DConfig)
    prompt_encoder: PromptEncoderKind = "mae"
    mae: MAEViTConfig = field(default_factory=MAEViTConfig)
    clip: ClipPromptConfig = field(default_factory=ClipPromptConfig)
    token_dim: int = 768
    fuser_channels: int = 96

    def __post_init__(self) -> None:
        check_choices(self)
        if self.clip.token_dim != self.token_dim:  # one width: the fuser's
            self.clip = dataclasses.replace(self.clip, token_dim=self.token_dim)
        if self.live3d.mode != "LT":
            raise ConfigError(f"the editing encoder builds on Live3D 'LT', got mode {self.live3d.mode!r}")

    @property
    def input_resolution(self) -> int:
        """Image side the released weights expect (512)."""
        return self.live3d.input_resolution

    @classmethod
    def tiny(cls, prompt_encoder: str = "mae") -> "EditingEncoderConfig":
        """Small widths, same key names: for tests (a tiny CLIP when prompt_encoder='clip')."""
        clip = ClipPromptConfig()
        if prompt_encoder == "clip":
            from models.editing.clip_prompt import tiny_open_clip_config

            clip = ClipPromptConfig(model_cfg=tiny_open_clip_config(), image_size=32)
        return cls(live3d=Live3DConfig.tiny("LT"), prompt_encoder=prompt_encoder, mae=MAEViTConfig.tiny(32),
                   clip=clip, token_dim=32, fuser_channels=8)


def _build_prompt_encoder(cfg: EditingEncoderConfig) -> tuple[nn.Module, str]:
    if cfg.prompt_encoder == "mae":
        if cfg.mae.embed_dim != cfg.token_dim:
            raise ConfigError(f"mae.embed_dim {cfg.mae.embed_dim} must equal token_dim {cfg.token_dim}")
        return MAEViT(cfg.mae), "mae_encoder"
    from models.editing.clip_prompt import ClipPromptEncoder

    return ClipPromptEncoder(dataclasses.replace(cfg.clip, token_dim=cfg.token_dim)), "clip_encoder"


class EditingEncoder(Live3DTrunk):
    """Image + prompt tokens → edited triplane."""

    def __init__(self, cfg: EditingEncoderConfig | None = None):
        cfg = cfg or EditingEncoderConfig()
        super().__init__(cfg.live3d)
        self.config = cfg
        prompt, name = _build_prompt_encoder(cfg)
        self.Ref_encoder = CrossAttentionFuser(prompt, name, in_channels=cfg.live3d.feat,
                                               pre_channels=cfg.fuser_channels, token_dim=cfg.token_dim)

    @property
    def prompt_encoder(self) -> nn.Module:
        """The MAE or CLIP prompt encoder (`Ref_encoder.mae_encoder` / `Ref_encoder.clip_encoder`)."""
        return self.Ref_encoder.prompt_encoder

    def encode_prompt(self, reference: torch.Tensor | None = None, text: Sequence[str] | str | None = None,
                      image_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt → (tokens N×T×token_dim, token_bias N×T or None).

        reference: N×3×H×W in [-1,1] (square, 512² for the released model). text: CLIP only; with both, the
        CLIP encoder mixes them with `image_weight` (see `ClipPromptEncoder.encode`). MAE: 197×768 tokens and
        no bias. Encode once and pass the result to every `forward` (a 1-batch prompt broadcasts).
        """
        if reference is None and text is None:
            raise ValueError("encode_prompt needs a reference image or a text")
        if self.config.prompt_encoder == "mae":
            if text is not None:
                raise ConfigError(
                    "this editing encoder's prompt encoder is MAE, which takes reference images only. For a text "
                    "instruction, edit the input in 2D with the InstructPix2Pix bridge "
                    "(pipelines/instruct_pix2pix.py) and use the result as the reference, or use a checkpoint "
                    "trained with prompt_encoder='clip'.")
            return self.prompt_encoder.encode_image(reference), None
        return self.prompt_encoder.encode(reference, text, image_weight)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor,
                token_bias: torch.Tensor | None = None) -> torch.Tensor:
        """image N×3×H×W in [-1,1] (512² for released weights), tokens N×T×C or 1×T×C (broadcast),
        token_bias None or N×T / 1×T → triplane N×96×H/2×W/2."""
        _, f, high = self.features(image)
        return self.Final_encoder(self.Ref_encoder(high, tokens, token_bias), f)

    def load_live3d_init(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Initialise the Live3D part from a Live3D LT `encoder_state_dict` (exactly its 170 keys)."""
        own = [k for k in self.state_dict() if not k.startswith("Ref_encoder.")]
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise UnknownCheckpointFormatError(
                "not a Live3D LT encoder state dict: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        result = self.load_state_dict(dict(state_dict), strict=False)
        assert not result.unexpected_keys
