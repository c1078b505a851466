"""`utils.device.keep_freed_cpu_memory` (issue #15): on glibc, large freed blocks stay in the process and are reused,
so allocating a large tensor again touches no new pages; the training setting switches it on for CPU runs."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocates, frees and re-allocates a 64 MB block 20 times and prints the minor page faults that took.
PROBE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    import torch
    from utils.device import keep_freed_cpu_memory
    keep = {keep}
    ok = keep_freed_cpu_memory() if keep else True
    for _ in range(3):
        torch.ones(16 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(16 * 2**20)
    print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(keep: bool) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), keep=keep)], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reused_blocks_fault_no_pages_in():
    ok, kept = _faults(True)
    _, default = _faults(False)
    assert ok
    pages = 20 * 64 * 2**20 // 4096  # every page of every re-allocation
    assert default >= pages // 2, default   # glibc's default: each 64 MB block is mapped afresh
    assert kept * 4 <= default, (kept, default)  # kept: the freed block is reused (measured 49,153 vs 327,680)


def test_training_setting_is_on_by_default():
    from training.config import TrainConfig
    from utils.config import load_config

    assert load_config(TrainConfig, str(ROOT / "configs" / "train.yaml"), []).keep_freed_memory is True
    assert load_config(TrainConfig, str(ROOT / "configs" / "train.yaml"),
                       ["keep_freed_memory=false"]).keep_freed_memory is False
