"""Stand-ins for NVIDIA's modules (`torch_utils`, `dnnlib`, `training.*`) when a test writes the pickles their code
writes: present in `sys.modules` only inside the block, so a loader under test can never import them."""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator, Sequence


@contextlib.contextmanager
def fake_modules(names: Sequence[str]) -> Iterator[dict[str, types.ModuleType]]:
    """Empty modules `names` in `sys.modules` while the block runs (the previous entries come back after); yields them
    by name, to be filled with classes. `torch_utils.persistence._reconstruct_persistent_obj`, when named, is a trap:
    a load that calls it fails."""
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    if "torch_utils.persistence" in mods:
        def _reconstruct_persistent_obj(meta):  # pragma: no cover - must never be called on load
            raise AssertionError("NVIDIA's reconstruct function ran")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
