"""`PortraitEditor`: load a checkpoint, lift a portrait to an (edited) triplane, render it from any camera.

Orchestration only: the layers live in `models/eg3d`, `models/live3d`, `models/editing`.

    editor = PortraitEditor.from_pretrained("pretrained_models/3dpe.pt")
    result = editor(images, reference=ref, cameras=original_test_cameras())
    result.triplanes                      # N×96×256×256
    result.views["image"]                 # N×V×3×512² (each input at every camera)
    editor(more_images, prompt=result.reusable_prompt, cameras=...)   # the same prompt, not encoded again

The steps (`prompt`, `edit` / `reconstruct`, `render`) stay public for code that needs only one of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from utils.device import resolve_device
from utils.errors import ThreeDPEError

PRECISIONS = ("fp32", "bf16")


class NotAnEditorCheckpointError(ThreeDPEError, ValueError):
    """The checkpoint loads but holds no encoder + renderer pair (e.g. a discriminator or generator alone)."""


@dataclass
class PromptEmbedding:
    """Prompt tokens for the cross-attention: tokens 1×T×C (or N×T×C), bias None or same-batch ×T.

    `reference` is the image the tokens came from (N×3×512² in [-1,1]); for a text prompt through the
    InstructPix2Pix bridge it is the 2D-edited input, for a CLIP text prompt it is None.
    """

    tokens: torch.Tensor
    bias: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    text: str | None = None

    @classmethod
    def stack(cls, embeddings: list[PromptEmbedding]) -> PromptEmbedding:
        """One N-batch embedding of N 1-batch ones (the per-input prompts of one call)."""
        def cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if parts[0] is None else torch.cat(parts)

        return cls(torch.cat([e.tokens for e in embeddings]), cat([e.bias for e in embeddings]),
                   cat([e.reference for e in embeddings]), embeddings[0].text)


#: a step of `PortraitEditor.__call__`, told to its `on_step` callback before it runs
EditStep = Literal["prompt", "edit", "reconstruct", "render"]
StepCallback = Callable[[EditStep, int | None], None]


@dataclass
class EditResult:
    """What one `PortraitEditor` call made.

    triplanes: N×96×256×256. views: {'image' N×V×3×512², 'image_raw' N×V×3×128², 'image_depth' N×V×1×128²}
    (input i at its V cameras), None when the call had no cameras. prompt: the embedding used (None for a
    reconstruction); made for each input (`per_input`), it is their N-batch.
    """

    triplanes: torch.Tensor
    views: dict[str, torch.Tensor] | None = None
    prompt: PromptEmbedding | None = None
    per_input: bool = False

    @property
    def reusable_prompt(self) -> PromptEmbedding | None:
        """The embedding to pass as `prompt=` with more inputs of the same edit; None when there is none or
        it was made from these inputs (a text through InstructPix2Pix)."""
        return None if self.per_input else self.prompt

    def reference(self, i: int) -> torch.Tensor | None:
        """The image input i's prompt came from, 1×3×R×R (the reference image, or input i's 2D edit by
        InstructPix2Pix); None for a CLIP text alone or a reconstruction."""
        if self.prompt is None or self.prompt.reference is None:
            return None
        return self.prompt.reference[i : i + 1] if self.per_input else self.prompt.reference[:1]


class PortraitEditor:
    """Editing (3DPE) or reconstruction (Live3D) encoder + the w-free triplane renderer.

    Every call runs in eval mode under `torch.inference_mode()`; rendering is deterministic.
    `precision='bf16'` runs encoder and renderer under bf16 autocast (opt-in speed mode);
    `channels_last=True` converts the conv weights' memory format; `compile=True` compiles them (`compile`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        renderer: nn.Module,
        *,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        text_bridge: Any | None = None,
        source: str = "",
        compile: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        self.precision = precision
        self.encoder = encoder.eval().requires_grad_(False).to(self.device)
        self.renderer = renderer.eval().requires_grad_(False).to(self.device)
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)
            self.renderer.to(memory_format=torch.channels_last)
        self.text_bridge = text_bridge
        self.source = source
        self.compiled = False
        if compile:
            self.compile()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        text_bridge: Any | None = None,
        compile: bool = False,
    ) -> "PortraitEditor":
        """Load any supported checkpoint (3dpe.pt, Live3D .pt, the project format; a path or a Hub id) → editor."""
        from models.checkpoint import build_models, load_checkpoint

        ckpt = load_checkpoint(path)
        models = build_models(ckpt)
        if "encoder" not in models or "renderer" not in models:
            raise NotAnEditorCheckpointError(
                f"{path}: a {ckpt.format} checkpoint has no encoder+renderer; the editing tools need "
                "3dpe.pt, a Live3D checkpoint, or a project checkpoint with both."
            )
        return cls(models["encoder"], models["renderer"], device=device, precision=precision,
                   channels_last=channels_last, text_bridge=text_bridge, source=str(path), compile=compile)

    @classmethod
    def random_init(
        cls,
        *,
        kind: str = "edit",
        tiny: bool = False,
        seed: int = 0,
        prompt_encoder: str = "mae",
        device: str | torch.device | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        text_bridge: Any | None = None,
        compile: bool = False,
    ) -> "PortraitEditor":
        """Random weights (full size, or `tiny` for tests): checks an install without any weight file."""
        from models.eg3d.config import RendererConfig
        from models.eg3d.triplane_renderer import TriplaneRenderer

        torch.manual_seed(seed)
        renderer = TriplaneRenderer(RendererConfig.tiny() if tiny else RendererConfig())
        if kind == "edit":
            from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig

            cfg = EditingEncoderConfig.tiny() if tiny else EditingEncoderConfig()
            cfg.prompt_encoder = prompt_encoder
            encoder: nn.Module = EditingEncoder(cfg)
        elif kind == "reconstruct":
            from models.live3d.encoder import Live3DConfig, Live3DEncoder

            encoder = Live3DEncoder(Live3DConfig.tiny("LT") if tiny else Live3DConfig())
        else:
            raise ValueError(f"kind must be 'edit' or 'reconstruct', got {kind!r}")
        return cls(encoder, renderer, device=device, precision=precision, channels_last=channels_last,
                   text_bridge=text_bridge, source="random-init" + ("-tiny" if tiny else ""), compile=compile)

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """`torch.compile` the encoder's and the renderer's forward: one graph each (`fullgraph=True`, so a
        graph break is an error, not a silent slow path); the prompt encoder (once per prompt) stays eager.

        The first call with a new input shape compiles (CPU, full size: see docs/benchmarks.md); later calls of
        that shape reuse the graph, and a second shape (a smaller last batch) compiles once more, with dynamic
        shapes. Outputs equal eager's to rounding. `mode`: torch.compile's (None, "max-autotune", ...);
        "reduce-overhead" (CUDA graphs) reuses output memory between calls, so copy a result you keep.
        `backend`: torch.compile's ("eager" captures the graphs without generating code: checks, dry runs).
        """
        for module in (self.encoder, self.renderer):
            module.compile(fullgraph=True, mode=mode, backend=backend)
        self.compiled = True

    # ------------------------------------------------------------------ properties
    @property
    def is_editing(self) -> bool:
        """True for an editing encoder (takes a prompt), False for a Live3D reconstruction encoder."""
        return hasattr(self.encoder, "encode_prompt")

    @property
    def prompt_encoder_kind(self) -> str | None:
        """'mae', 'clip' or None (reconstruction)."""
        if not self.is_editing:
            return None
        return self.encoder.config.prompt_encoder

    @property
    def input_resolution(self) -> int:
        """Image side the encoder expects (512 for released weights)."""
        return int(self.encoder.config.input_resolution)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32)

    # ------------------------------------------------------------------ prompts
    def prompt_is_per_input(self, text: str | None = None) -> bool:
        """Whether a prompt with this `text` gives a different embedding for every input image.

        True for a text with a MAE checkpoint (3dpe.pt): the InstructPix2Pix bridge edits each input in 2D
        and that edit is the reference, so the embedding cannot be reused. A reference image or a CLIP
        text gives one embedding that serves every input (compute it once).
        """
        return text is not None and self.is_editing and self.prompt_encoder_kind != "clip"

    @torch.inference_mode()
    def prompt(
        self,
        image: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        text: str | None = None,
        image_weight: float = 0.5,
    ) -> PromptEmbedding:
        """The prompt embedding of an edit: the one place that decides how a prompt is encoded.

        image: the input portrait N×3×R×R in [-1,1] (only used by the InstructPix2Pix bridge);
        reference: 1×3×R×R in [-1,1] (R = `input_resolution`); text: an instruction or a caption.

        =================  ===========================================  ===============================
        prompt             MAE checkpoint (3dpe.pt)                     CLIP checkpoint
        =================  ===========================================  ===============================
        reference          image tokens                                 image tokens
        text               the bridge edits `image` in 2D by the        CLIP text tokens
                           instruction; the edit is the reference
        reference + text   the text, as above (one prompt per model)    both, mixed by `image_weight`
        =================  ===========================================  ===============================

        Only the MAE text row depends on `image` (`prompt_is_per_input`); every other embedding can be
        computed once and passed to `edit` for every input. `PromptEmbedding.reference` is the image the
        tokens came from (the 2D edit for the bridge, None for a CLIP text alone).
        """
        if not self.is_editing:
            raise ValueError("this checkpoint reconstructs (Live3D); it takes no prompt")
        if reference is None and text is None:
            raise ValueError("give a reference image or a text prompt")
        if self.prompt_is_per_input(text):
            if self.text_bridge is None:
                raise ValueError(
                    "this checkpoint's prompt encoder is MAE (image prompts only); text prompts need the "
                    "InstructPix2Pix bridge (the tools set it up; see docs/prompts.md)"
                )
            if image is None:
                raise ValueError("the InstructPix2Pix bridge needs the input image to edit")
            edited = self.text_bridge(self._to(image), [text] * image.shape[0]).to(self.device)
            emb = self.prompt(reference=edited)
            return PromptEmbedding(emb.tokens, emb.bias, reference=edited, text=text)
        with self._autocast():
            if text is not None and reference is not None:
                tokens, bias = self.encoder.encode_prompt(reference=self._to(reference), text=[text],
                                                          image_weight=image_weight)
            elif text is not None:
                tokens, bias = self.encoder.encode_prompt(text=[text])
            else:
                tokens, bias = self.encoder.encode_prompt(reference=self._to(reference))
        tokens = tokens.float()
        return PromptEmbedding(tokens, None if bias is None else bias.float(),
                               reference=None if reference is None else self._to(reference), text=text)

    def encode_prompt(
        self,
        reference: torch.Tensor | None = None,
        text: str | None = None,
        image: torch.Tensor | None = None,
        image_weight: float = 0.5,
    ) -> PromptEmbedding:
        """Same as `prompt` (the earlier name, kept for existing code)."""
        return self.prompt(image=image, reference=reference, text=text, image_weight=image_weight)

    # ------------------------------------------------------------------ the call
    @torch.inference_mode()
    def __call__(
        self,
        images: torch.Tensor,
        *,
        reference: torch.Tensor | None = None,
        text: str | None = None,
        prompt: PromptEmbedding | None = None,
        prompt_image: torch.Tensor | None = None,
        image_weight: float = 0.5,
        cameras: torch.Tensor | None = None,
        on_step: StepCallback | None = None,
    ) -> EditResult:
        """Edit (or reconstruct) portraits and render them: the one call every tool makes.

        images: N×3×R×R in [-1,1] (R = `input_resolution`; `pipelines.portraits.PortraitPreparer` makes them).
        reference (1×3×R×R in [-1,1]) and/or text: the edit, encoded by `prompt` (its table says how).
        prompt: an embedding from an earlier call (`EditResult.reusable_prompt`), used as it is for every
            input; reference and text are then not read.
        prompt_image: for a text through the InstructPix2Pix bridge, the portrait 1×3×R×R whose 2D edit serves
            as the reference of every input (a video's first face); without it each input is edited for itself.
        cameras: V×25, every input seen from each; or N×V×25, input i from its own V cameras (a video frame's).
            None: no rendering (`views` None).
        on_step(step, index): called before each step ('prompt', 'edit', 'reconstruct', 'render') with the
            input it is for, or None when it is for all of them (progress display).

        Prompt reuse is decided here and nowhere else: an embedding that does not depend on the inputs (a
        reference image, a CLIP text, the bridge's edit of `prompt_image`) is encoded once for the N inputs and
        returned as `EditResult.reusable_prompt`: pass it as `prompt=` with more inputs of the same edit. A
        text through the bridge without `prompt_image` is encoded for each input, and `reusable_prompt` is None.
        A reconstruction (Live3D) checkpoint takes no prompt.
        """
        step = on_step or _no_step
        # 1. prompt and encoder → triplanes
        if not self.is_editing:
            if reference is not None or text is not None or prompt is not None:
                raise ValueError("this checkpoint reconstructs (Live3D); it takes no prompt")
            step("reconstruct", None)
            result = EditResult(self.reconstruct(images))
        elif prompt is None and prompt_image is None and self.prompt_is_per_input(text):
            result = self._edit_each(images, reference, text, image_weight, step)
        else:
            if prompt is None:
                step("prompt", None)
                prompt = self.prompt(image=prompt_image, reference=reference, text=text, image_weight=image_weight)
            step("edit", None)
            result = EditResult(self.edit(images, prompt), prompt=prompt)
        # 2. renderer → views
        if cameras is not None:
            result.views = self._render_all(result.triplanes, cameras, step)
        return result

    def _edit_each(self, images: torch.Tensor, reference: torch.Tensor | None, text: str | None,
                   image_weight: float, step: StepCallback) -> EditResult:
        """Inputs whose prompt depends on them: input i's prompt (its own bridge edit), then its edit."""
        planes, prompts = [], []
        for i in range(images.shape[0]):
            image = images[i : i + 1]
            step("prompt", i)
            prompts.append(self.prompt(image=image, reference=reference, text=text, image_weight=image_weight))
            step("edit", i)
            planes.append(self.edit(image, prompts[-1]))
        return EditResult(torch.cat(planes), prompt=PromptEmbedding.stack(prompts), per_input=True)

    def _render_all(self, planes: torch.Tensor, cameras: torch.Tensor, step: StepCallback) -> dict[str, torch.Tensor]:
        """Triplanes N×96×H×W at cameras V×25 (each input at all) or N×V×25 (each at its own) → N×V×… views."""
        if cameras.ndim == 2:
            views = []
            for i in range(planes.shape[0]):
                step("render", i)
                views.append(self.render(planes[i : i + 1], cameras))
            return {k: torch.stack([v[k] for v in views]) for k in views[0]}
        step("render", None)  # view v of every input in one batched call
        per_view = [self.render(planes, cameras[:, v]) for v in range(cameras.shape[1])]
        return {k: torch.stack([v[k] for v in per_view], dim=1) for k in per_view[0]}

    # ------------------------------------------------------------------ encode
    @torch.inference_mode()
    def edit(self, images: torch.Tensor, prompt: PromptEmbedding | torch.Tensor) -> torch.Tensor:
        """Edited triplanes N×96×256×256 for images N×3×512² in [-1,1] and a prompt.

        `prompt` is a `PromptEmbedding` (a 1-batch embedding is shared by every image) or a reference
        image tensor (encoded on the fly).
        """
        if not self.is_editing:
            raise ValueError("this checkpoint reconstructs (Live3D); call reconstruct()")
        if isinstance(prompt, torch.Tensor):
            prompt = self.prompt(reference=prompt)
        with self._autocast():
            planes = self.encoder(self._to(images), prompt.tokens, prompt.bias)
        return planes.float()

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Triplanes N×96×256×256 of images N×3×512² in [-1,1] (Live3D checkpoints)."""
        if self.is_editing:
            raise ValueError("this checkpoint edits (3DPE); call edit() with a prompt")
        with self._autocast():
            planes = self.encoder(self._to(images))
        return planes.float()

    # ------------------------------------------------------------------ render
    @torch.inference_mode()
    def render(self, planes: torch.Tensor, cameras: torch.Tensor, max_views_per_call: int = 8) -> dict[str, torch.Tensor]:
        """Render one triplane (1×96×H×W) at V cameras (V×25), or N triplanes at N cameras.

        Returns {'image' V×3×512² (roughly [-1,1], not clamped), 'image_raw' V×3×128², 'image_depth' V×1×128²}.
        Views are rendered in batched calls of at most `max_views_per_call`.
        """
        planes = self._to(planes)
        cameras = cameras.to(self.device, torch.float32)
        outs: dict[str, list[torch.Tensor]] = {}
        for i in range(0, cameras.shape[0], max_views_per_call):
            cam = cameras[i : i + max_views_per_call]
            pl = planes if planes.shape[0] == 1 else planes[i : i + max_views_per_call]
            with self._autocast():
                res = self.renderer(pl, cam, deterministic=True)
            for k in ("image", "image_raw", "image_depth"):
                outs.setdefault(k, []).append(res[k].float())
        return {k: torch.cat(v) for k, v in outs.items()}

    @torch.inference_mode()
    def sample_density(self, planes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Raw density sigma at world points coords M×3 of one triplane → M×1 (for meshing)."""
        return self.renderer.sample_density(self._to(planes[:1]), coords.to(self.device)[None])[0]


def _no_step(step: str, index: int | None) -> None:
    """The default `on_step`: nothing to show."""
