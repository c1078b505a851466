"""The command-line options every editing tool shares, declared once, and the editor they describe.

    p = argparse.ArgumentParser(...)
    add_editor_arguments(p)          # --checkpoint --device --precision --channels-last --compile --seed --random-init
                                     # --random-init-kind --prompt-encoder --tiny, and the --ip2p-* bridge group
    args = p.parse_args(argv)
    try:
        editor = editor_from_args(args, needs_text=args.prompt is not None)
    except ThreeDPEError as e:       # a missing checkpoint, a Hub id that cannot be had: one line, exit 2
        return report_user_error(e)

test_scripts.py (tools/inference.py), tools/demo.py, tools/edit_video.py and tools/evaluate.py all declare their
editor options here, so a new option lands in every tool at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from utils.errors import MissingWeightsError, ThreeDPEError

if TYPE_CHECKING:
    from pipelines.editor import PortraitEditor

DEFAULT_CHECKPOINT = "pretrained_models/3dpe.pt"
CHECKPOINT_HELP = (
    "Download 3dpe.pt from the original authors' release (see README 'Pretrained models': "
    "https://github.com/EzioBy/3dpe) and place it in pretrained_models/, or pass --checkpoint PATH "
    "(a Live3D encoder_render_*.pt, a project checkpoint folder or a Hugging Face Hub id ORG/NAME also works). "
    "Use --random-init to test the install without weights."
)


class CheckpointNotFoundError(MissingWeightsError):
    """--checkpoint names no local file or folder and is not a Hub id. One line: the path and where to get 3dpe.pt."""

    def __init__(self, path: str):
        self.path = str(path)
        ThreeDPEError.__init__(self, f"checkpoint '{path}' not found. {CHECKPOINT_HELP}")


#: every option `add_editor_arguments` declares (tests check that each tool has all of them)
EDITOR_FLAGS = (
    "--checkpoint", "--device", "--precision", "--channels-last", "--compile", "--seed", "--random-init", "--random-init-kind",
    "--prompt-encoder", "--tiny", "--ip2p-model", "--ip2p-steps", "--ip2p-guidance", "--ip2p-image-guidance",
)


def add_editor_arguments(
    parser: argparse.ArgumentParser,
    *,
    checkpoint_default: str | None = DEFAULT_CHECKPOINT,
    checkpoint_help: str = "3dpe.pt, a Live3D .pt, a project checkpoint dir, or a Hub id ORG/NAME[@REV][/FILE]",
) -> None:
    """Declare the shared editor options (`EDITOR_FLAGS`) on `parser`.

    `checkpoint_default`/`checkpoint_help` let a tool whose checkpoint is optional (tools/evaluate.py) say so.
    """
    p = parser
    p.add_argument("--checkpoint", default=checkpoint_default, help=checkpoint_help)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: opt-in speed mode")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the conv weights")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and renderer: the first call of each input size compiles "
                        "(minutes on a CPU), later ones run faster; pays off over many images (docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random (InstructPix2Pix, random init)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights: checks the install without any weight file (the views come out as one "
                        "flat colour, no face)")
    p.add_argument("--random-init-kind", choices=["edit", "reconstruct"], default="edit",
                   help="with --random-init: a 3DPE editor or a Live3D reconstructor")
    p.add_argument("--prompt-encoder", choices=["mae", "clip"], default="mae", help="with --random-init")
    p.add_argument("--tiny", action="store_true", help="with --random-init: tiny models (smoke tests)")
    g = p.add_argument_group("InstructPix2Pix bridge (text prompts with a MAE checkpoint such as 3dpe.pt)")
    g.add_argument("--ip2p-model", default=None,
                   help="diffusers folder or Hub id (default: pretrained_models/instruct-pix2pix, else "
                        "timbrooks/instruct-pix2pix from the Hugging Face cache; get it with `hf download "
                        "timbrooks/instruct-pix2pix --local-dir pretrained_models/instruct-pix2pix`)")
    g.add_argument("--ip2p-steps", type=int, default=20)
    g.add_argument("--ip2p-guidance", type=float, default=7.5)
    g.add_argument("--ip2p-image-guidance", type=float, default=1.5)


def editor_argv(args: argparse.Namespace) -> list[str]:
    """The shared options of `args` that differ from their defaults (and are set), as command-line words:
    how one tool passes its editor options on to another tool's parser (tools/evaluate.py → inference)."""
    defaults = argparse.ArgumentParser(add_help=False)
    add_editor_arguments(defaults)
    out: list[str] = []
    for flag in EDITOR_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None or value is False or value == defaults.get_default(flag[2:].replace("-", "_")):
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


def check_checkpoint_arg(args: argparse.Namespace) -> None:
    """Raise `CheckpointNotFoundError` when --checkpoint (without --random-init) is neither a local path nor a
    Hub id: a file-system check only, so a tool can make it before anything slow."""
    from models.hub import is_local_or_hub

    if not args.random_init and (args.checkpoint is None or not is_local_or_hub(args.checkpoint)):
        raise CheckpointNotFoundError(args.checkpoint)


def describe_editor_source(args: argparse.Namespace) -> str:
    """What `editor_from_args` will load, in words (for the 'loading' status line)."""
    if args.random_init:
        size = "tiny" if args.tiny else "full-size"
        return f"random weights ({size} {'3DPE editor' if args.random_init_kind == 'edit' else 'Live3D'})"
    return str(args.checkpoint)


RANDOM_INIT_WARNING = ("WARNING: --random-init: random weights; the views come out as one flat colour without a "
                       "face (this only checks the install).")


def editor_from_args(args: argparse.Namespace, needs_text: bool, warn_random_init: bool = True) -> PortraitEditor:
    """The `PortraitEditor` the shared options describe: random weights (--random-init) or a checkpoint.

    Seeds torch with --seed first, so random weights and anything random afterwards repeat. `needs_text`:
    give the editor the InstructPix2Pix bridge (from the --ip2p-* options; its weights load on the first
    text edit with a MAE checkpoint). Raises `CheckpointNotFoundError` for a checkpoint that is not there and
    another `ThreeDPEError` for a Hub id that cannot be had or a file that is no editor checkpoint: every tool
    reports it with `utils.errors.report_user_error` (one line, exit status 2). `warn_random_init`: print
    `RANDOM_INIT_WARNING` on stderr for --random-init (a tool that printed it already passes False).
    """
    import torch

    from pipelines.editor import PortraitEditor
    from pipelines.instruct_pix2pix import bridge_from_args
    from utils.device import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    bridge = bridge_from_args(args, device) if needs_text else None
    if args.random_init:
        editor = PortraitEditor.random_init(kind=args.random_init_kind, tiny=args.tiny, seed=args.seed,
                                            prompt_encoder=args.prompt_encoder, device=device,
                                            precision=args.precision, channels_last=args.channels_last,
                                            text_bridge=bridge, compile=args.compile)
        if warn_random_init:
            print(RANDOM_INIT_WARNING, file=sys.stderr)
        return editor
    check_checkpoint_arg(args)  # a Hub id is checked by from_pretrained
    return PortraitEditor.from_pretrained(args.checkpoint, device=device, precision=args.precision,
                                          channels_last=args.channels_last, text_bridge=bridge, compile=args.compile)
