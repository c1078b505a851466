"""Convert any supported checkpoint to the project format (or back to an original layout).

    python -m tools.convert_checkpoint SRC DST [--to threedpe|3dpe-pt|eg3d-pth] [--config ARCH.json]

SRC: an EG3D network pickle (`ffhqrebalanced512-128.pkl`: G_ema, plus D when present), the converted EG3D
`.pth`, `3dpe.pt`, a Live3D LT/Normal `.pt`, or a project checkpoint directory — a path, or a Hugging Face
Hub id `org/name[@rev][/file]` (docs/checkpoints.md). The format is detected from the content. Pickles are
read with the restricted unpickler: nothing in them runs.

--to threedpe (default): DST is a directory (config.json + model.safetensors + README.md, the model card).
--to 3dpe-pt: DST is the original `3dpe.pt` layout (file; a directory gets `3dpe.pt` inside).
--to eg3d-pth: DST is the original converted EG3D `.pth` (file; a directory gets `ffhqrebalanced512-128.pth`).
--config: JSON {component: {config fields}} for checkpoints trained with a non-default architecture.
3dpe.pt and Live3D files record no architecture: without --config the original's is assumed, and checked
against the weights before anything is written (the error names the first key that does not fit).

Exit status 0 on success; 1 for a refused pickle (the offending global is named), a missing file, an
unknown format, or weights that do not fit the architecture, with the reason on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from utils.errors import ThreeDPEError

TARGETS = ("threedpe", "3dpe-pt", "eg3d-pth")
_DEFAULT_NAMES = {"3dpe-pt": "3dpe.pt", "eg3d-pth": "ffhqrebalanced512-128.pth"}


def _target_file(dst: Path, target: str) -> Path:
    if dst.suffix in (".pt", ".pth") and not dst.is_dir():
        return dst
    return dst / _DEFAULT_NAMES[target]


def convert(src: str | Path, dst: str | Path, to: str = "threedpe", config: dict | None = None) -> Path:
    """Load `src` (any format) and write it as `to`; returns the written path."""
    return _convert(src, dst, to, config)[0]


def _convert(src: str | Path, dst: str | Path, to: str, config: dict | None) -> tuple[Path, str]:
    from models import checkpoint as ck
    from models.model_card import write_conversion_card

    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    ckpt = ck.load_checkpoint(src, configs=config)
    dst = Path(dst)
    if to == "threedpe":
        assumed = tuple(c for c, ok in ckpt.meta.get("config_matched", {}).items() if not ok)
        if assumed:  # architectures assumed, not recorded: check they fit before config.json records them
            ck.build_models(ckpt, components=assumed, device="meta")
        out = ck.save_pretrained(dst, ckpt.components, ckpt.model_type, ck.config_dicts(ckpt), ck.source_info(ckpt))
        write_conversion_card(out, ckpt, src)  # README.md: licence, source sha256 (models/model_card.py)
    elif to == "3dpe-pt":
        out = ck.export_3dpe_pt(ckpt, _target_file(dst, to))
    else:
        out = ck.export_eg3d_pth(ckpt, _target_file(dst, to))
    return out, ckpt.format


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint to read (.pkl, .pth, .pt, or a project directory)")
    parser.add_argument("dst", help="output directory (threedpe) or file (3dpe-pt, eg3d-pth)")
    parser.add_argument("--to", choices=TARGETS, default="threedpe", help="output format (default: threedpe)")
    parser.add_argument("--config", default=None, help="JSON file {component: {config fields}} (non-default architectures)")
    args = parser.parse_args(argv)
    try:
        config = None
        if args.config:
            cfg_path = Path(args.config)
            if not cfg_path.is_file():
                raise ThreeDPEError(f"--config file '{cfg_path}' does not exist")
            config = json.loads(cfg_path.read_text())
            config = config.get("config", config)  # accept a whole config.json too
        out, fmt = _convert(args.src, args.dst, args.to, config)
    except (ThreeDPEError, FileNotFoundError) as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} ({fmt}) -> {out} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
