"""Training-data generation from the command line: `python -m tools.datagen` (= `train_scripts.py datagen`).

    python -m tools.datagen --config configs/datagen.yaml source.seeds=0-9999 output_dir=data/ours
    torchrun --nproc_per_node=8 -m tools.datagen --config configs/datagen.yaml
    python -m tools.datagen --config configs/datagen.yaml --merge-only

What it writes and how it resumes: pipelines/datagen.py and docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from pipelines import datagen
from utils.config import load_config
from utils.distributed import print_line
from utils.errors import ThreeDPEError, report_user_error


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m tools.datagen` (and `train_scripts.py datagen`): 0 = done, 1 = some units failed
    (a rerun retries them), 2 = a config error (one line on stderr). Rank 0 prints the summary as JSON."""
    ap = argparse.ArgumentParser(prog="python -m tools.datagen", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML config (configs/datagen.yaml)")
    ap.add_argument("--merge-only", action="store_true", help="only merge the per-rank manifests/labels")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. source.seeds=0-99")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.merge_only:
            cfg = load_config(datagen.DatagenConfig, args.config, args.overrides)
            print_line(json.dumps(datagen.merge_outputs(cfg.output_dir)))
            return 0
        summary = datagen.main(args.config, args.overrides)
    except ThreeDPEError as e:
        return report_user_error(e)
    if int(os.environ.get("RANK", "0")) == 0:
        print_line(json.dumps({k: v for k, v in summary.items() if k != "per_rank"}))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(cli())
