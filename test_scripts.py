#!/usr/bin/env python
"""Multi-view 3D-aware portrait edits (3DPE) or reconstructions (Live3D) for a folder of portraits.

    python test_scripts.py                                   # pretrained_models/3dpe.pt on test_imgs/ → results/
    python test_scripts.py --ref style.png --video --mesh
    python test_scripts.py --prompt "make him look like a golden statue"
    python test_scripts.py --random-init                     # check an install without any weights

The command lives in tools/inference.py (`run_inference` for use from Python); see docs/inference.md.
"""
from __future__ import annotations

import sys

from tools.inference import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
