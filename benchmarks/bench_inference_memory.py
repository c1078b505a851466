"""Inference memory against the number of inputs: peak RSS of `test_scripts.py` on N and factor·N inputs.

    python benchmarks/bench_inference_memory.py [--n 120] [--factor 4] [--yaws 0] [--out FILE]

Random tiny models (`--random-init --tiny`, CPU), inputs made on the fly with one distinct reference per input
(as in test_imgs/). Each run is its own process; its peak resident set size (ru_maxrss) is reported, and
`ratio` = peak(factor·N) / peak(N): about 1 when memory does not grow with the number of inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, emit, machine_info


def make_inputs(data_dir: Path, n: int, size: int = 32) -> Path:
    """`n` random portraits in data_dir/input and one reference of the same stem each in data_dir/ref."""
    for sub in ("input", "ref"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        for sub in ("input", "ref"):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(data_dir / sub / f"p{i:06d}.png")
    return data_dir


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def child(argv: list[str]) -> None:
    """Run the inference command in this process, then print its peak RSS as the last line (JSON)."""
    from tools.inference import main as inference_main

    rc = inference_main(argv)
    print(json.dumps({"exit_code": rc, "peak_rss_mb": peak_rss_mb()}))


def measure(n: int, work: Path, yaws: list[str], threads: int) -> dict:
    """Peak RSS (MiB) of a fresh process editing `n` inputs."""
    data = make_inputs(work / f"data{n}", n)
    cmd = [sys.executable, __file__, "--child", "--random-init", "--tiny", "--device", "cpu", "--data-dir", str(data),
           "--output-dir", str(work / f"out{n}"), "--yaws", *yaws]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"inference on {n} inputs failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["exit_code"] != 0:
        raise SystemExit(f"inference on {n} inputs reported failures:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return {"inputs": n, "peak_rss_mb": out["peak_rss_mb"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120, help="inputs of the smaller run")
    ap.add_argument("--factor", type=int, default=4, help="the larger run has factor·n inputs")
    ap.add_argument("--yaws", nargs="+", default=["0"], help="views per input (fewer: faster, same memory story)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_inference_memory.") as tmp:
        small = measure(args.n, Path(tmp), args.yaws, args.threads)
        large = measure(args.n * args.factor, Path(tmp), args.yaws, args.threads)
    result = {"benchmark": "inference_memory", "machine": machine_info(torch.device("cpu")), "models": "random tiny",
              "small": small, "large": large, "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 4)}
    emit(result, args.out)


if __name__ == "__main__":
    main()
