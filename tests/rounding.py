"""Float32 rounding bounds that hold on every CPU, for comparisons with a float64 evaluation (tests/float64.py).

Two float32 computations of the same maths (another op order, batch size, fused pass or CPU kernel) differ by
rounding whose digits depend on the machine; the bounds below depend only on the maths:

- A float32 sum of n products (a matrix product, a convolution, a FIR filter), in any order and with or without
  fused multiply-adds, is within γ_n · Σ|a_i·b_i| of the exact sum (Higham, "Accuracy and Stability of Numerical
  Algorithms", §3.1), γ_n = n·u / (1 − n·u) with u = 2⁻²⁴. Σ|a_i·b_i| is the same linear map applied to |a| and
  |b|, evaluated in float64.
- A chain of k correctly rounded elementwise operations (+, −, ×, ÷, sqrt, a cast) is within γ_k relative.
- A network's forward value, relative to the output's largest |value|: each of `depth` products in a row (matrix
  products, convolutions, attention) of ≤ K terms adds ~EPS32·√K (K roundings of either sign): `forward_rel`.
  Not a worst case but a statistical bound with a wide margin (measured errors are 10–100× smaller).
Forward values only: a derivative through a kink (ReLU, leaky ReLU, clamp, abs, max-pool) switches its slope when a
pre-activation within rounding of the kink lands on the other side, so gradients of such networks are compared in
float64 (`F64_REL`), not with these bounds.
"""
from __future__ import annotations

import math

import torch

from float64 import EPS32

U32 = EPS32 / 2  # float32 unit roundoff: one rounding changes a value by at most U32 relative
# Two float64 evaluations of the same maths (another route, batch or order): float64 rounding (1.1e-16) × a few
# hundred roundings in sequence and moderate cancellation stays below 1e-12; a real difference (a wrong mask, scale,
# order or term) is ≥ 1e-4. The same bound as tests/training/test_step_equivalence.py's.
F64_REL = 1e-9


def gamma32(n: int) -> float:
    """γ_n = n·u / (1 − n·u) for float32: the relative error bound of n roundings."""
    return n * U32 / (1 - n * U32)


def forward_rel(depth: int, k: int) -> float:
    """EPS32·depth·√k: the float32 error of a forward value relative to the output's max |value| (see above)."""
    return EPS32 * depth * math.sqrt(k)


def assert_within(x: torch.Tensor, ref64: torch.Tensor, bound64: torch.Tensor | float, what: str = "") -> None:
    """|x − ref64| ≤ bound64 elementwise (x float32 or float64, ref64 and bound64 float64), with the worst
    element's error and bound in the message."""
    err = (x.detach().double() - ref64).abs()
    bound = torch.as_tensor(bound64, dtype=torch.float64).expand_as(err)
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements beyond their rounding bound; "
                             f"worst error {float(err.flatten()[i]):.3g} > bound {float(bound.flatten()[i]):.3g}")
