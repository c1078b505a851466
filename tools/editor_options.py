"""The command-line options every editing tool shares, declared once, and the editor they describe.

    p = argparse.ArgumentParser(...)
    add_editor_arguments(p)          # --checkpoint --device --precision --channels-last --compile --seed --random-init
                                     # --random-init-kind --prompt-encoder --tiny, and the --ip2p-* bridge group
    options = EditorOptions.from_args(p.parse_args(argv))   # typed: what the code below the tools is given
    try:
        editor = options.build(needs_text=args.prompt is not None)
    except ThreeDPEError as e:       # a missing checkpoint, a Hub id that cannot be had: one line, exit 2
        return report_user_error(e)

test_scripts.py (tools/inference.py), tools/demo.py, tools/edit_video.py and tools/evaluate.py all declare their
editor options here, so a new option lands in every tool at once. `EditorOptions` is the one truth of their names
and defaults: the flags are its fields (`random_init_kind` ↔ `--random-init-kind`), their defaults its defaults.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
import typing
from typing import TYPE_CHECKING, Any, Literal

from models.checkpoint.files import DEFAULT_CHECKPOINT
from utils.errors import MissingWeightsError, ThreeDPEError

if TYPE_CHECKING:
    from pipelines.editor import PortraitEditor
    from pipelines.instruct_pix2pix import InstructPix2PixConfig, LazyInstructPix2Pix

CHECKPOINT_HELP = (
    "Download 3dpe.pt from the original authors' release (see README 'Pretrained models': "
    "https://github.com/EzioBy/3dpe) and place it in pretrained_models/, or pass --checkpoint PATH "
    "(a Live3D encoder_render_*.pt, a project checkpoint folder or a Hugging Face Hub id ORG/NAME also works). "
    "Use --random-init to test the install without weights."
)
RANDOM_INIT_WARNING = ("WARNING: --random-init: random weights; the views come out as one flat colour without a "
                       "face (this only checks the install).")


class CheckpointNotFoundError(MissingWeightsError):
    """--checkpoint names no local file or folder and is not a Hub id. One line: the path and where to get 3dpe.pt."""

    def __init__(self, path: str):
        self.path = str(path)
        ThreeDPEError.__init__(self, f"checkpoint '{path}' not found. {CHECKPOINT_HELP}")


@dataclass
class EditorOptions:
    """The editor the shared options describe, typed: tools hand this (never argv) to the code below them.

    A field per option (`--ip2p-image-guidance` ↔ `ip2p_image_guidance`), with the option's default. The
    `ip2p_*` defaults are `InstructPix2PixConfig`'s (tests/pipelines/test_editor_front.py keeps them equal; this module
    loads without torch, so it cannot import them). `ip2p_model` None: the default weights, never downloaded.
    """

    checkpoint: str | None = DEFAULT_CHECKPOINT
    device: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    keep_freed_memory: bool = True
    seed: int = 0
    random_init: bool = False
    random_init_kind: Literal["edit", "reconstruct"] = "edit"
    prompt_encoder: Literal["mae", "clip"] = "mae"
    tiny: bool = False
    ip2p_model: str | None = None
    ip2p_steps: int = 20
    ip2p_guidance: float = 7.5
    ip2p_image_guidance: float = 1.5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EditorOptions:
        """The options `add_editor_arguments` declared, read from parsed `args`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def check_checkpoint(self) -> None:
        """`check_checkpoint_arg` of these options (a file-system check, before anything slow)."""
        check_checkpoint_arg(self)

    def describe(self) -> str:
        """What `build` will load, in words (for the 'loading' status line)."""
        if self.random_init:
            size = "tiny" if self.tiny else "full-size"
            return f"random weights ({size} {'3DPE editor' if self.random_init_kind == 'edit' else 'Live3D'})"
        return str(self.checkpoint)

    def instruct_pix2pix(self) -> InstructPix2PixConfig:
        """The InstructPix2Pix bridge's settings (`--ip2p-*`, `--seed`)."""
        from pipelines.instruct_pix2pix import DEFAULT_HUB_ID, InstructPix2PixConfig

        return InstructPix2PixConfig(model=self.ip2p_model or DEFAULT_HUB_ID, steps=self.ip2p_steps,
                                     guidance_scale=self.ip2p_guidance,
                                     image_guidance_scale=self.ip2p_image_guidance, seed=self.seed)

    def text_bridge(self, device: Any = None) -> LazyInstructPix2Pix:
        """The InstructPix2Pix bridge (loaded on first use); only a `--ip2p-model` given may be downloaded."""
        from pipelines.instruct_pix2pix import LazyInstructPix2Pix

        return LazyInstructPix2Pix(self.instruct_pix2pix(), device=device, allow_download=self.ip2p_model is not None)

    def build(self, needs_text: bool, warn_random_init: bool = True) -> PortraitEditor:
        """The `PortraitEditor` these options describe: random weights (--random-init) or a checkpoint.

        Seeds torch with `seed` first, so random weights and anything random afterwards repeat. `needs_text`:
        give the editor the InstructPix2Pix bridge (its weights load on the first text edit with a MAE
        checkpoint). Raises `CheckpointNotFoundError` for a checkpoint that is not there and another
        `ThreeDPEError` for a Hub id that cannot be had or a file that is no editor checkpoint: every tool
        reports it with `utils.errors.report_user_error` (one line, exit status 2). `warn_random_init`: print
        `RANDOM_INIT_WARNING` on stderr for --random-init (a tool that printed it already passes False).
        """
        import torch

        from pipelines.editor import PortraitEditor
        from utils.device import resolve_device

        device = resolve_device(self.device)
        if self.keep_freed_memory:
            from utils.device import keep_freed_cpu_memory

            keep_freed_cpu_memory(device)
        torch.manual_seed(self.seed)
        common = dict(device=device, precision=self.precision, channels_last=self.channels_last,
                      text_bridge=self.text_bridge(device) if needs_text else None, compile=self.compile)
        if self.random_init:
            editor = PortraitEditor.random_init(kind=self.random_init_kind, tiny=self.tiny, seed=self.seed,
                                                prompt_encoder=self.prompt_encoder, **common)
            if warn_random_init:
                print(RANDOM_INIT_WARNING, file=sys.stderr)
            return editor
        self.check_checkpoint()  # a Hub id is checked by from_pretrained
        return PortraitEditor.from_pretrained(self.checkpoint, **common)


#: every option `add_editor_arguments` declares (tests check that each tool has all of them)
EDITOR_FLAGS = tuple(f"--{f.name.replace('_', '-')}" for f in fields(EditorOptions))


def _choices(field: str) -> tuple[str, ...]:
    """The values of an `EditorOptions` Literal field: the command line's choices come from the type."""
    return typing.get_args(typing.get_type_hints(EditorOptions)[field])


def add_editor_arguments(
    parser: argparse.ArgumentParser,
    *,
    defaults: EditorOptions | None = None,
    checkpoint_help: str = "3dpe.pt, a Live3D .pt, a project checkpoint dir, or a Hub id ORG/NAME[@REV][/FILE]",
) -> None:
    """Declare the shared editor options (`EDITOR_FLAGS`) on `parser`, with the defaults of `defaults`
    (`EditorOptions()`; tools/evaluate.py, whose checkpoint is optional, passes `checkpoint=None`)."""
    d = defaults or EditorOptions()
    p = parser
    p.add_argument("--checkpoint", default=d.checkpoint, help=checkpoint_help)
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--precision", choices=_choices("precision"), default=d.precision, help="bf16: opt-in speed mode")
    p.add_argument("--channels-last", action="store_true", default=d.channels_last,
                   help="channels-last memory format for the conv weights")
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="torch.compile the encoder and renderer: the first call of each input size compiles "
                        "(minutes on a CPU), later ones run faster; pays off over many images (docs/benchmarks.md)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=d.keep_freed_memory,
                   help="on CPU with glibc, keep freed memory in the process for reuse instead of mapping every "
                        "large tensor afresh (a 512 view 2.2 -> 1.5 s on a 2-core Xeon; the resident size stays "
                        "at its peak); --no-keep-freed-memory leaves the C library's default")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed for anything random (InstructPix2Pix, random init)")
    p.add_argument("--random-init", action="store_true", default=d.random_init,
                   help="random weights: checks the install without any weight file (the views come out as one "
                        "flat colour, no face)")
    p.add_argument("--random-init-kind", choices=_choices("random_init_kind"), default=d.random_init_kind,
                   help="with --random-init: a 3DPE editor or a Live3D reconstructor")
    p.add_argument("--prompt-encoder", choices=_choices("prompt_encoder"), default=d.prompt_encoder, help="with --random-init")
    p.add_argument("--tiny", action="store_true", default=d.tiny, help="with --random-init: tiny models (smoke tests)")
    g = p.add_argument_group("InstructPix2Pix bridge (text prompts with a MAE checkpoint such as 3dpe.pt)")
    g.add_argument("--ip2p-model", default=d.ip2p_model,
                   help="diffusers folder or Hub id (default: pretrained_models/instruct-pix2pix, else "
                        "timbrooks/instruct-pix2pix from the Hugging Face cache; get it with `hf download "
                        "timbrooks/instruct-pix2pix --local-dir pretrained_models/instruct-pix2pix`)")
    g.add_argument("--ip2p-steps", type=int, default=d.ip2p_steps)
    g.add_argument("--ip2p-guidance", type=float, default=d.ip2p_guidance)
    g.add_argument("--ip2p-image-guidance", type=float, default=d.ip2p_image_guidance)


def check_checkpoint_arg(options: Any) -> None:
    """Raise `CheckpointNotFoundError` when the checkpoint (without random init) is neither a local path nor a
    Hub id: a file-system check only, so a tool can make it before anything slow. `options`: `EditorOptions`
    or parsed args (anything with `.checkpoint` and `.random_init`)."""
    from models.checkpoint.hub import is_local_or_hub

    if not options.random_init and (options.checkpoint is None or not is_local_or_hub(options.checkpoint)):
        raise CheckpointNotFoundError(options.checkpoint)
