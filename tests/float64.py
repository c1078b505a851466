"""Float64 evaluation of code written for float32: the reference that tolerances are derived from.

Two fp32 computations of the same math (another op order, a fused pass, another CPU's kernels) differ by rounding
that depends on the machine; a float64 evaluation of the same inputs and weights is ~1e-16 from exact on every CPU,
so a test compares each fp32 path with it (tolerance = the fp32 error the quantity can have) and compares two paths
with each other in float64 (tolerance = float64 rounding, many orders below any real difference).

The models cast to float32 in places (`x.float()`, `x.to(torch.float32)`, `dtype=torch.float32` constants) to undo
fp16/bf16 storage; under `Float64Mode` those requests give float64, so a model doubled with `to_float64` runs in
float64 from end to end, autograd included.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: one float32 rounding is at most EPS32 / 2 relative


class Float64Mode(TorchFunctionMode):
    """Every float32 request (`.float()`, a `torch.float32` argument or `dtype=` keyword) becomes float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


def to_float64(obj: Any) -> Any:
    """Modules (in place) and floating tensors → float64; dicts, lists and tuples element-wise; the rest as is."""
    if isinstance(obj, torch.nn.Module):
        return obj.double()
    if torch.is_tensor(obj):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: to_float64(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float64(v) for v in obj)
    return obj


def rel_err(a: torch.Tensor | float, ref: torch.Tensor | float) -> float:
    """max |a − ref| / max |ref| (the absolute error when ref vanishes), computed in float64."""
    a, ref = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    scale = float(ref.abs().max())
    err = float((a.double() - ref.double()).abs().max())
    return err / scale if scale > 0 else err


def float32_and_float64(model: torch.nn.Module, run, context=torch.no_grad) -> tuple:
    """`run(model)` as it is (float32), and `run` of a float64 copy of `model` under `Float64Mode`, both inside
    `context()` (default `torch.no_grad`; `torch.inference_mode` for renderers)."""
    import copy

    model64 = to_float64(copy.deepcopy(model))
    with context():
        out32 = run(model)
        with Float64Mode():
            out64 = run(model64)
    return out32, out64
