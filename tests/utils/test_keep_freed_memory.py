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

# Allocates, frees and re-allocates a 64 MB block `n` times and prints the minor page faults that took.
PROBE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    import torch
    from utils.device import keep_freed_cpu_memory
    keep = {keep}
    ok = keep_freed_cpu_memory("cpu") if keep else True
    for _ in range(3):
        torch.ones(16 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({n}):
        torch.ones(16 * 2**20)
    print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(keep: bool, n: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), keep=keep, n=n)], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reused_blocks_fault_no_pages_in():
    # Compared as the growth from 20 to 60 re-allocations: while the heap settles, the first few blocks may still
    # fault in (measured 3 to 6 blocks' pages, depending on the machine); after that a kept block faults nothing.
    ok, kept_20 = _faults(True, 20)
    _, kept_60 = _faults(True, 60)
    _, default_20 = _faults(False, 20)
    _, default_60 = _faults(False, 60)
    assert ok
    pages = 40 * 64 * 2**20 // 4096  # every page of the 40 further re-allocations
    assert default_60 - default_20 >= pages // 2, (default_20, default_60)  # glibc's default: each block mapped afresh
    # kept: the freed block is reused (measured growth 0 vs 655,360 pages on a Sapphire-Rapids Xeon)
    assert (kept_60 - kept_20) * 8 <= default_60 - default_20, (kept_20, kept_60, default_20, default_60)


def test_off_the_cpu_nothing_changes(monkeypatch):
    """A process computing on another device leaves the C library's setting (`mallopt` is never called)."""
    import ctypes

    from utils.device import keep_freed_cpu_memory

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("mallopt called off the CPU"))
    assert keep_freed_cpu_memory("meta") is False


def test_training_setting_is_on_by_default():
    from training.config import TrainConfig
    from utils.config import load_config

    assert load_config(TrainConfig, str(ROOT / "configs" / "train.yaml"), []).keep_freed_memory is True
    assert load_config(TrainConfig, str(ROOT / "configs" / "train.yaml"),
                       ["keep_freed_memory=false"]).keep_freed_memory is False


# Edits one portrait with a tiny random editor after dirtying the heap, and prints a hash of the triplane and views.
EDIT_PROBE = textwrap.dedent("""
    import hashlib, sys
    sys.path.insert(0, {root!r})
    import torch
    from tools.editor_options import EditorOptions
    from utils.cameras import original_test_cameras
    editor = EditorOptions(checkpoint=None, device="cpu", random_init=True, tiny=True,
                           keep_freed_memory={keep}).build(needs_text=False, warn_random_init=False)
    g = torch.Generator().manual_seed(0)
    x, ref = torch.rand(2, 1, 3, 64, 64, generator=g) * 2 - 1
    with torch.inference_mode():
        editor(x, reference=ref)  # leaves freed blocks with values in them for the call below
        out = editor(x.flip(-1), reference=ref, cameras=original_test_cameras())
    print(hashlib.sha1(out.triplanes.numpy().tobytes() + out.views["image"].numpy().tobytes()).hexdigest())
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_changes_no_output():
    """Reused blocks hold old values where fresh pages are zeros: an edit that read memory it never wrote would differ
    between the two settings. Bit for bit the same."""
    def run(keep: bool) -> str:
        return subprocess.run([sys.executable, "-c", EDIT_PROBE.format(root=str(ROOT), keep=keep)],
                              capture_output=True, text=True, check=True).stdout.split()[-1]

    assert run(True) == run(False)
