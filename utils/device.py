"""Device selection: one helper so no module hard-codes a device string."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device`, or CUDA when it is available and `device` is None/'auto', else CPU."""
    if device is None or (isinstance(device, str) and device in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else platform's processor or machine string): for benchmark reports."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: glibc `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_cpu_memory(device: str | torch.device) -> bool:
    """Keep freed heap memory in the process for reuse (glibc only): no `mmap` for large blocks, no trimming.

    A CPU training step allocates and frees hundreds of 100 MB-sized tensors; by default glibc maps each one
    fresh and unmaps it on free, so every new tensor page-faults its memory in again (a fifth of a full-size
    step's time went to the kernel on CPU-2). With these two settings freed blocks are reused instead, at the
    cost of a slightly higher resident peak. The same as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`
    in the environment. `device`: the device the process computes on. Returns False (and changes nothing) when that
    is not the CPU, or on other C libraries.
    """
    import ctypes
    import platform

    if torch.device(device).type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
