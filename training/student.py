"""The student the training loop optimises: the editing encoder and the frozen renderer in one module.

    student = Student(encoder, renderer, render_chunk=0)   # DDP wraps this unit, so gradients average over ranks
    tri, views = student(image, reference, cameras)
"""
from __future__ import annotations

import torch
from torch import nn

from training.losses import Stage, no_stage

RENDER_KEYS = ("image", "image_raw", "image_depth", "feature_image")


class Student(nn.Module):
    """The DDP-wrapped unit: editing encoder + the shared frozen renderer.

    forward(image N×3×R², reference N×3×R² in [-1,1], cameras V·N×25 (V = 1 or 2 views, view-major))
    → (triplane N×96×P×P, renders of the triplane at every camera: dict of V·N-batched tensors).
    """

    def __init__(self, encoder: nn.Module, renderer: nn.Module, render_chunk: int = 0):
        super().__init__()
        self.encoder = encoder
        self.renderer = renderer
        self.render_chunk = render_chunk

    def forward(self, image: torch.Tensor, reference: torch.Tensor, cameras: torch.Tensor,
                deterministic: bool = False, texts: list[str] | None = None,
                use_text: torch.Tensor | None = None,
                stage: Stage = no_stage) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with stage("student/encode"):
            if texts is None or use_text is None:
                tokens, bias = self.encoder.encode_prompt(reference=reference)
            else:
                tokens, bias = self.prompt_tokens(reference, texts, use_text)
            tri = self.encoder(image, tokens, bias)
        with stage("student/render"):
            return tri, self._render(tri, cameras, deterministic)

    def _render(self, tri: torch.Tensor, cameras: torch.Tensor, deterministic: bool) -> dict[str, torch.Tensor]:
        views = cameras.shape[0] // tri.shape[0]
        planes = tri if views == 1 else tri.repeat(views, 1, 1, 1)
        if not (self.render_chunk and torch.is_grad_enabled()):
            return self.renderer(planes, cameras, deterministic=deterministic)
        # Activation checkpointing: keep only each chunk's inputs, recompute its renderer graph in backward
        # (same random draws: the RNG state is replayed). Peak memory: one chunk's graph instead of all views'.
        from torch.utils.checkpoint import checkpoint

        def render(p: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.renderer(p, c, deterministic=deterministic)
            return tuple(out[k] for k in RENDER_KEYS)

        parts = [checkpoint(render, planes[i:i + self.render_chunk], cameras[i:i + self.render_chunk],
                            use_reentrant=False) for i in range(0, planes.shape[0], self.render_chunk)]
        return {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(RENDER_KEYS)}

    def prompt_tokens(self, reference: torch.Tensor, texts: list[str],
                      use_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP prompts, per sample either the instruction text (use_text[i]) or the reference image.

        Both are encoded for every sample (image tokens first, then text tokens) and the unused part is masked
        with a -inf attention bias, so every sample's attention sees exactly one prompt and both projections
        stay in the graph (DDP needs no unused-parameter search).
        """
        tokens, bias = self.encoder.encode_prompt(reference=reference, text=list(texts))
        is_image = torch.arange(bias.shape[1], device=bias.device) < self.encoder.prompt_encoder.num_image_tokens
        unused = is_image[None, :] == use_text.to(bias.device, torch.bool)[:, None]  # N×T, no boolean indexing
        return tokens, bias.masked_fill(unused, float("-inf"))
