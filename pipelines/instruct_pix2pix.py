"""The one InstructPix2Pix wrapper: 2D image editing from a text instruction (diffusers).

Used by training-data generation (edited targets) and by inference, where a text prompt given to an MAE
checkpoint (e.g. the released 3dpe.pt) is turned into a reference image first:

    editor = InstructPix2PixEditor(InstructPix2PixConfig())          # loads timbrooks/instruct-pix2pix
    edited = editor(images, ["turn him into a zombie"] * n, seeds=[0, 1, ...])   # N×3×H×W in [-1,1]

Every sample gets its own `torch.Generator` (CPU) seeded from its seed, so a sample's noise does not depend
on what else is in the batch, nor on the device the noise is drawn for. Its pixels can still change by float
rounding with the batch (kernels choose their blocking, hence their summation order, by batch shape):
call it with one sample at a time when results must be bit-exact (pipelines/datagen.py does).
`build_tiny_instruct_pix2pix()` builds a random, tiny pipeline fully offline (tests, benchmarks).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.batching import broadcast_list
from utils.device import resolve_device
from utils.errors import BadImageError, ConfigError, MissingWeightsError, ThreeDPEError

DEFAULT_LOCAL_FOLDER = "pretrained_models/instruct-pix2pix"
DEFAULT_HUB_ID = "timbrooks/instruct-pix2pix"
DOWNLOAD_COMMAND = f"hf download {DEFAULT_HUB_ID} --local-dir {DEFAULT_LOCAL_FOLDER}"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class InstructPix2PixConfig:
    """Options of `InstructPix2PixEditor` (defaults: the usual InstructPix2Pix settings at 512 px).

    model: a Hugging Face id or a local diffusers folder. With the default id, a local
        `pretrained_models/instruct-pix2pix` folder is used when it exists.
    steps, guidance_scale (text CFG), image_guidance_scale: sampling settings (EulerAncestral scheduler).
    seed: the seed of every sample when `seeds` is not given to the call.
    dtype: 'auto' (fp16 on CUDA, fp32 on CPU), 'fp32', 'fp16' or 'bf16'.
    resolution: the longer image side the edit runs at (rounded to the VAE's multiple); the result is
        resized back to the input size.
    batch_size: samples per pipeline call; more is faster on a GPU, but a sample's pixels may differ slightly
        (float rounding, carried through the sampling steps) with the other samples of its call.
    disable_safety_checker: load without the NSFW checker (it blacks out false positives on portraits).
    """

    model: str = DEFAULT_HUB_ID
    steps: int = 20
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    seed: int = 0
    dtype: Literal["auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"] = "auto"
    resolution: int = 512
    batch_size: int = 4
    disable_safety_checker: bool = True


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"instruct_pix2pix dtype '{name}' unknown (auto, fp32, fp16, bf16)")
    return _DTYPES[name]


class InstructPix2PixMissingError(MissingWeightsError):
    """Text prompts with a MAE checkpoint need the InstructPix2Pix weights, and they are not there.

    One line: where they were looked for, the `hf download` command that gets them, and `--ip2p-model PATH`.
    """

    def __init__(self, where: str, why: str, command: str = DOWNLOAD_COMMAND):
        self.path = str(where)
        ThreeDPEError.__init__(
            self, f"text prompts with a MAE checkpoint (such as 3dpe.pt) go through InstructPix2Pix, and its weights "
            f"are missing: {why}. Get them with `{command}`, or pass --ip2p-model PATH (a diffusers folder with "
            "model_index.json).")


def _source(cfg: InstructPix2PixConfig) -> str:
    """Where `cfg.model` is read from: the default Hub id means the local default folder when that exists."""
    if cfg.model == DEFAULT_HUB_ID and Path(DEFAULT_LOCAL_FOLDER).is_dir():
        return DEFAULT_LOCAL_FOLDER
    return cfg.model


def _looks_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


def check_instruct_pix2pix(cfg: InstructPix2PixConfig, allow_download: bool = False) -> str:
    """Where the weights of `cfg.model` will be read from, found without loading them → a folder or a Hub id.

    A local folder must hold `model_index.json`; a Hub id must be in the Hugging Face cache, unless
    `allow_download` (an id the user named) and HF_HUB_OFFLINE is not set. Takes milliseconds, so the tools
    call it before loading anything else. Raises `InstructPix2PixMissingError` (one line).
    """
    source = _source(cfg)
    if _looks_local(source):
        folder = Path(source).expanduser()
        if (folder / "model_index.json").is_file():
            return str(folder)
        why = (f"'{source}' has no model_index.json (an incomplete download?)" if folder.is_dir()
               else f"no folder '{source}'")
        raise InstructPix2PixMissingError(source, why)
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        return source
    if allow_download and not constants.HF_HUB_OFFLINE:
        return source
    if source == DEFAULT_HUB_ID:
        raise InstructPix2PixMissingError(
            DEFAULT_LOCAL_FOLDER, f"no folder '{DEFAULT_LOCAL_FOLDER}', and '{DEFAULT_HUB_ID}' is not in the "
            "Hugging Face cache")
    offline = " and HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else ""
    raise InstructPix2PixMissingError(source, f"'{source}' is not in the Hugging Face cache{offline}",
                                      command=f"hf download {source}")


def load_instruct_pix2pix_pipeline(cfg: InstructPix2PixConfig, device: torch.device, dtype: torch.dtype):
    """diffusers StableDiffusionInstructPix2PixPipeline from a local folder or the HF id (cache when offline)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    source = check_instruct_pix2pix(cfg, allow_download=True)
    kwargs: dict[str, Any] = {"dtype": dtype}  # diffusers' current name for torch_dtype
    if cfg.disable_safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # offline without a cache, or a partial download
        raise InstructPix2PixMissingError(
            source, f"'{source}' could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return pipe.to(device)


def _to_batch(images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
    """Tensor N×3×H×W in [-1,1] (float32, CPU or the tensor's device) from a tensor or a list of PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise BadImageError(f"expected images N×3×H×W in [-1,1], got shape {tuple(images.shape)}")
        return images.float()
    arrays = []
    for im in images:
        if not hasattr(im, "convert"):
            raise BadImageError(f"expected a tensor or PIL images, got {type(im).__name__}")
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    if len({a.shape for a in arrays}) != 1:
        raise BadImageError(f"PIL images must share one size to be edited in a batch, got "
                            f"{sorted({a.shape[:2] for a in arrays})}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


class InstructPix2PixEditor:
    """Edits images with text instructions. Call: images + instructions (+ seeds) → edited images."""

    def __init__(self, cfg: InstructPix2PixConfig | None = None, device: str | torch.device | None = None,
                 pipe: Any = None):
        self.cfg = cfg or InstructPix2PixConfig()
        self.device = resolve_device(device)
        if pipe is None:
            pipe = load_instruct_pix2pix_pipeline(self.cfg, self.device, _resolve_dtype(self.cfg.dtype, self.device))
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pipeline(cls, pipe: Any, cfg: InstructPix2PixConfig | None = None) -> "InstructPix2PixEditor":
        """Wrap an already built pipeline (tests, a shared pipeline); its device and dtype are kept."""
        return cls(cfg, device=pipe.device, pipe=pipe)

    def _work_size(self, h: int, w: int) -> tuple[int, int]:
        mult = int(getattr(self.pipe, "vae_scale_factor", 8))
        scale = self.cfg.resolution / max(h, w)
        return (max(mult, int(round(h * scale / mult)) * mult), max(mult, int(round(w * scale / mult)) * mult))

    @torch.inference_mode()
    def __call__(
        self,
        images: torch.Tensor | Sequence[Any],
        instructions: Sequence[str] | str,
        seeds: Sequence[int] | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Edit a batch.

        images: N×3×H×W in [-1,1] (or a list of N same-size PIL images); instructions: N strings or one.
        seeds: one per sample (default: cfg.seed for every sample).
        Returns N×3×H×W in [-1,1], float32, on the input tensor's device (CPU for PIL input).
        """
        x = _to_batch(images)
        out_device = x.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        n, _, h, w = x.shape
        prompts = [str(p) for p in broadcast_list(instructions, n, "instructions")]
        seeds = [int(s) for s in broadcast_list(self.cfg.seed if seeds is None else seeds, n, "seeds")]
        wh, ww = self._work_size(h, w)
        x01 = (x.clamp(-1, 1) + 1) * 0.5
        if (wh, ww) != (h, w):
            x01 = F.interpolate(x01, size=(wh, ww), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        results = []
        bs = max(1, int(self.cfg.batch_size))
        for start in range(0, n, bs):
            sl = slice(start, start + bs)
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[sl]]
            out = self.pipe(
                prompt=prompts[sl],
                image=x01[sl].to(self.pipe.device),
                num_inference_steps=int(steps or self.cfg.steps),
                guidance_scale=float(self.cfg.guidance_scale if guidance_scale is None else guidance_scale),
                image_guidance_scale=float(
                    self.cfg.image_guidance_scale if image_guidance_scale is None else image_guidance_scale),
                generator=gens,
                output_type="pt",
            ).images
            results.append(out.float().to(out_device))
        y = torch.cat(results) * 2 - 1
        if (wh, ww) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return y.clamp(-1, 1)


def clip_bpe_tokenizer_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write CLIP's BPE vocabulary (shipped inside open_clip) as `vocab.json` + `merges.txt` for
    transformers' CLIPTokenizer. Returns the two paths."""
    from open_clip.tokenizer import SimpleTokenizer

    from utils.atomic import atomic_write_text

    tok = SimpleTokenizer()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    # open_clip names the two special tokens differently from the original CLIP/HF files; the ids are the same.
    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = {renames.get(k, k): v for k, v in tok.encoder.items()}
    atomic_write_text(vocab, json.dumps(encoder, ensure_ascii=False))
    ranked = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    atomic_write_text(merges, "#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in ranked) + "\n")
    return vocab, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """transformers CLIPTokenizer built offline from open_clip's BPE files (same ids as the real SD tokenizer)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = clip_bpe_tokenizer_files(tmp)
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=model_max_length,
                             pad_token="<|endoftext|>")


def build_tiny_instruct_pix2pix(seed: int = 0, device: str | torch.device | None = "cpu"):
    """A random, tiny StableDiffusionInstructPix2PixPipeline (offline, seconds at 64 px).

    UNet2DConditionModel with 8 input channels (4 noisy latents + 4 image latents), a 4-level AutoencoderKL
    (latents 1/8 of the image, as SD), a 1-layer CLIPTextModel, CLIP's real tokenizer, EulerAncestral scheduler,
    no safety checker. Weights are drawn from `seed` without touching the global RNG.
    """
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=64)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            projection_dim=16))
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_clip_tokenizer(77), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


class LazyInstructPix2Pix:
    """The InstructPix2Pix bridge for text prompts with MAE checkpoints, built on first use.

    `bridge(images N×3×H×W in [-1,1], instructions) -> N×3×H×W` edits with `cfg.seed` for every sample, so the
    pipeline (GBs of weights) is only loaded when a text prompt actually needs it. `check()` finds the weights
    without loading them (call it before a long job). `allow_download`: a Hub id the user named may be fetched;
    the default is read only from `pretrained_models/instruct-pix2pix` or the cache. A failed load is not
    retried: later calls raise the same error at once.
    """

    def __init__(self, cfg: InstructPix2PixConfig, device: str | torch.device | None = None,
                 allow_download: bool = False):
        self.cfg, self.device, self.allow_download = cfg, device, allow_download
        self._editor: InstructPix2PixEditor | None = None
        self._error: ThreeDPEError | None = None

    def check(self) -> str:
        """Where the weights will be read from (`check_instruct_pix2pix`); raises InstructPix2PixMissingError."""
        return check_instruct_pix2pix(self.cfg, allow_download=self.allow_download)

    def __call__(self, images: torch.Tensor, instructions: Sequence[str]) -> torch.Tensor:
        if self._editor is None:
            if self._error is not None:
                raise self._error
            try:
                self.check()
                self._editor = InstructPix2PixEditor(self.cfg, device=self.device)
            except ThreeDPEError as e:
                self._error = e
                raise
        return self._editor(images, list(instructions), seeds=[self.cfg.seed] * len(instructions))
