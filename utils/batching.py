"""Per-sample arguments: one value for the whole batch, or one per sample."""
from __future__ import annotations

from typing import Any


def broadcast_list(value: Any, n: int, what: str = "values") -> list:
    """`value` as a list of n items: a scalar/str or a 1-item sequence is repeated; a length other than n or 1 raises."""
    if isinstance(value, (str, int, float)):
        return [value] * n
    value = list(value)
    if len(value) == 1 and n > 1:
        value = value * n
    if len(value) != n:
        raise ValueError(f"expected {n} {what} (or one), got {len(value)}")
    return value
