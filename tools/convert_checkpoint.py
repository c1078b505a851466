"""Convert any supported checkpoint to the project format (or back to an original layout).

    python -m tools.convert_checkpoint SRC DST [--to threedpe|3dpe-pt|eg3d-pth] [--config ARCH.json]

SRC: an EG3D network pickle (`ffhqrebalanced512-128.pkl`: G_ema, plus D when present), the converted EG3D
`.pth`, `3dpe.pt`, a Live3D LT/Normal `.pt`, or a project checkpoint directory — a path, or a Hugging Face
Hub id `org/name[@rev][/file]` (docs/checkpoints.md). The format is detected from the content. Pickles are
read with the restricted unpickler: nothing in them runs.

--to threedpe (default): DST is a directory (config.json + model.safetensors + README.md, the model card).
--to 3dpe-pt: DST is the original `3dpe.pt` layout (file; a directory gets `3dpe.pt` inside).
--to eg3d-pth: DST is the original converted EG3D `.pth` (file; a directory gets `ffhqrebalanced512-128.pth`).
--config: JSON {component: {config fields}}, or a whole project config.json (e.g. a run's
`exps/<name>/final/config.json`), for files that record no architecture: the original release's 3dpe.pt
and Live3D files. Without it their original (full-size) architecture is assumed (a discriminator of
another size is read off its weights' shapes) and checked against the weights before anything is written
(the error names the first key that does not fit). Files this project writes (project folders, the 3dpe.pt
of a training run or of `--to 3dpe-pt`) record their architecture and need no --config; components named in
--config override it, components the source does not hold are ignored.

Exit status 0 on success; 2 with one line `error: ...` on stderr for a missing, truncated or corrupt file,
a refused pickle (the offending global is named), an unknown format, or weights that do not fit the
architecture.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from utils.errors import ConfigError, ThreeDPEError, report_user_error

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
    from models.checkpoint.model_card import write_conversion_card

    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    ckpt = ck.load_checkpoint(src, configs=config)
    dst = Path(dst)
    if to in ("threedpe", "3dpe-pt"):
        assumed = tuple(c for c, ok in ckpt.meta.get("config_matched", {}).items() if not ok)
        if assumed:  # architectures assumed, not recorded: check they fit before the output records them
            ck.build_models(ckpt, components=assumed, device="meta")
    if to == "threedpe":
        out = ck.save_pretrained(dst, ckpt.components, ckpt.model_type, ck.config_dicts(ckpt), ck.source_info(ckpt))
        write_conversion_card(out, ckpt, src)  # README.md: licence, source sha256 (models/checkpoint/model_card.py)
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
    parser.add_argument("--config", default=None,
                        help="JSON {component: {config fields}} or a project config.json: the architecture of a "
                             "file that records none (the original release's 3dpe.pt / Live3D at another size)")
    args = parser.parse_args(argv)
    try:
        config = read_config_arg(args.config) if args.config else None
    except ThreeDPEError as e:
        return report_user_error(e)
    try:
        out, fmt = _convert(args.src, args.dst, args.to, config)
    except (ThreeDPEError, FileNotFoundError) as e:  # the file named once, first when the reason does not
        return report_user_error(e if str(args.src) in str(e) else ThreeDPEError(f"{args.src}: {e}"))
    print(f"converted {args.src} ({fmt}) -> {out} ({args.to})")
    return 0


def read_config_arg(path: str | Path) -> dict:
    """The `--config` file: {component: {config fields}}, or a whole project config.json (its `config` part)."""
    cfg_path = Path(path)
    if not cfg_path.is_file():
        raise ConfigError(f"--config file '{cfg_path}' does not exist")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config file '{cfg_path}' is not valid JSON: {e}") from e
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        config = config["config"]  # a whole config.json
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ConfigError(f"--config file '{cfg_path}' must hold {{component: {{config fields}}}} "
                          "(or be a project config.json)")
    return config


if __name__ == "__main__":
    sys.exit(main())
