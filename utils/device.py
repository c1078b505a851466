"""Device selection: one helper so no module hard-codes a device string."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device`, or CUDA when it is available and `device` is None/'auto', else CPU."""
    if device is None or (isinstance(device, str) and device in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
