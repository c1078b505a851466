"""The faster training step computes what the plain step computes (issue #15), judged against float64 (issue #23).

The fast path (folded super-resolution, frozen convolutions and decoder with their own backward, D's fused bias/
activation/gain, the D's real side before the student) and the slow path (the step as it was before the speed-ups:
modulated super-resolution, separate bias/activation/gain passes, plain autograd through the triplane lookups and the
decoder, the whole D step after the student) run one step of tiny models with deterministic rendering, every loss term
on and the GAN from step 0.

Why float64: two fp32 computations of the same math differ by rounding that depends on the CPU's kernels, and the
derivatives of a network with leaky ReLU / PReLU / clamp are discontinuous: 51 million values pass through such kinks
in this tiny step, dozens of them within 1e-6 (relative) of the kink. In fp32 one of them can land on the other side
and switch its slope. On an AVX-512 CPU the slow path computes one D pre-activation as +1.5e-8 where float64 gives
−2.3e-7, which moves R1 by 8.9e-4 relative and the 8×8 block's gradients by ~1%; the fast path happened to land on the
right side there. Neither path is wrong: it is fp32 at a kink. So:
  1. the two paths are compared with each other in float64 (same weights and inputs, doubled): tight, on any CPU;
  2. the fast path in fp32 is compared with its own float64 evaluation, with the error fp32 can have per quantity
     (see `_fp32_tolerance`): forward values are continuous at kinks and get rounding bounds; R1 and the gradients,
     derivatives through the kinks, get bounds that admit a switched slope.
The float64 run is the fp32 path op for op (the traces of aten ops are compared), so it is a reference for that path.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from float64 import EPS32, Float64Mode, rel_err, to_float64
from rounding import F64_REL
from tests.training.test_training import make_tiny_dataset, tiny_config

TERMS_ON = ["loss.feature=0.3", "loss.id=0.1", "gan.start_step=0", "loss.one_camera_per_batch=false",
            "data.val_fraction=0.0", "model.render_chunk=0"]

# F64_REL (1e-9): float64 rounding is 1.1e-16; amplified by this step's worst cancellation (the identity terms,
# 1 − cos ≈ 2e-5: ×5e4) and a few hundred roundings in sequence it stays below 1e-10. A real difference between the
# paths (a lost gain, bias or term) is ≥ 1e-4. Measured: ≤ 2e-15.
# Forward values that are sums or means of O(1) quantities behind a few dozen layers: each layer adds ≲ 1 rounding
# of its outputs, a mean over ≤ 2^20 values with pairwise summation adds ≲ 20: ≲ 84·EPS32 = 1e-5 relative.
# Measured on an AVX-512 CPU: ≤ 1.6e-6 (either path).
SUM_REL = 84 * EPS32
# A derivative through a kink: one switched slope moves R1 by ~1e-3 and a small layer's gradients by ~1% of their max
# (measured: 8.9e-4 and 1.3e-2); two or three such switches stay within these. Without a switch the error is
# rounding (measured ≤ 3.4e-6): these bounds still catch a missing term or a wrong scale.
R1_REL = 1e-2
GRAD_REL = 5e-2


def _setup(tmp: Path, name: str, *overrides: str):
    from training.setup import build_training, set_modes

    data = make_tiny_dataset(tmp / "data", n_portraits=4)
    cfg = tiny_config(data, tmp / "exps", name, *TERMS_ON, *overrides)
    s = build_training(cfg)
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    s.D.train()
    batch = next(iter(s.loader))
    cams = torch.cat([batch["camera"], batch["camera"].flip(0)])  # a second view per sample, no RNG
    return s, cfg, batch, cams


def _capture(s) -> tuple[dict, list]:
    got: dict[str, dict[str, torch.Tensor]] = {}
    names_g = {id(p): n for n, p in s.encoder.named_parameters()}

    def grab_g(opt, args, kwargs):
        got["student"] = {names_g[id(p)]: p.grad.clone() for p in s.trainable if p.grad is not None}

    def grab_d(opt, args, kwargs):
        got["D"] = {n: p.grad.clone() for n, p in s.D.named_parameters() if p.grad is not None}

    return got, [s.opt_g.register_step_pre_hook(grab_g), s.opt_d.register_step_pre_hook(grab_d)]


def slow_step(s, cfg, batch, cams) -> tuple[torch.Tensor, dict, dict]:
    """The step as it was before the speed-ups: student graph kept through the whole D step."""
    from training.losses import discriminator_step, g_adv_loss, generator_step
    from training.train import d_sized, teacher_views

    n = batch["input"].shape[0]
    t_tri, t_views = teacher_views(s, batch["target"], cams, True, contextlib.nullcontext)
    s_tri, s_views = s.student(batch["input"], batch["reference"], cams, deterministic=True)
    loss, terms = s.loss_fn(s_tri, t_tri, s_views, t_views, n)
    r = s.D.config.img_resolution
    real, ref, fake = d_sized(batch["target"], r), d_sized(batch["reference"], r), s_views["image"][:n]
    logs = discriminator_step(s.D, s.opt_d, real, fake, ref, batch["camera"], cfg.loss.r1_gamma)
    terms["gan"] = g_adv_loss(s.D, fake, ref, batch["camera"])
    loss = loss + cfg.loss.adv * terms["gan"]
    logs.update(generator_step(loss, s.opt_g, s.trainable))
    return loss, terms, logs


class _OpTrace(TorchDispatchMode):
    """The names and shapes of the aten ops that run (dtype left out: it is what differs between the runs)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if torch.is_tensor(a))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def _run(tmp: Path, fast: bool, float64: bool, trace: bool = False) -> dict:
    """One step of the fast or slow path, in fp32 or float64, from a fresh identical setup."""
    from models.eg3d import renderer, stylegan2
    from training.train import train_step

    saved = stylegan2.FOLD_WITH_INPUT_GRAD, stylegan2.FOLD_CONV_GAIN, renderer.RECOMPUTE_FROZEN_DECODE
    stylegan2.FOLD_WITH_INPUT_GRAD = stylegan2.FOLD_CONV_GAIN = renderer.RECOMPUTE_FROZEN_DECODE = fast
    try:
        s, cfg, batch, cams = _setup(tmp, "fast" if fast else "slow")
        if float64:
            for m in (s.encoder, s.teacher, s.renderer, s.D, s.loss_fn):
                to_float64(m)
            batch, cams = to_float64(batch), to_float64(cams)
        got, hooks = _capture(s)
        calls: list[str] = []
        hooks += [s.D.register_forward_hook(lambda m, a, o: calls.append("D")),
                  s.encoder.register_forward_hook(lambda m, a, o: calls.append("student"))]
        tracer = _OpTrace() if trace else contextlib.nullcontext()
        with Float64Mode() if float64 else contextlib.nullcontext(), tracer:
            if fast:
                out = train_step(s, cfg, batch, cams, 0, contextlib.nullcontext, deterministic=True)
                loss, terms, logs = out.loss, out.terms, out.logs
            else:
                loss, terms, logs = slow_step(s, cfg, batch, cams)
        [h.remove() for h in hooks]
    finally:
        stylegan2.FOLD_WITH_INPUT_GRAD, stylegan2.FOLD_CONV_GAIN, renderer.RECOMPUTE_FROZEN_DECODE = saved
    return {"loss": float(loss.detach()), "terms": {k: float(v.detach()) for k, v in terms.items()},
            "logs": {k: float(v) for k, v in logs.items()}, "grads": got, "calls": calls, "ops": tracer.ops if trace else None,
            "r1_gamma": cfg.loss.r1_gamma}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """The fast path in fp32 and float64 (op traces recorded), and the slow path in float64."""
    tmp = tmp_path_factory.mktemp("equivalence")
    return {"fast32": _run(tmp / "fast32", fast=True, float64=False, trace=True),
            "fast64": _run(tmp / "fast64", fast=True, float64=True, trace=True),
            "slow64": _run(tmp / "slow64", fast=False, float64=True)}


def _assert_grads_close(got: dict, ref: dict, tol: float) -> None:
    """Each gradient within `tol` of its tensor's max |g| (the updated parameters are not compared: Adam's first step
    is lr·sign(g), which turns the rounding noise of near-zero gradients into ±lr)."""
    for group in ("student", "D"):
        assert set(got[group]) == set(ref[group]) and ref[group], group
        worst = max((rel_err(got[group][k], g), k) for k, g in ref[group].items())
        assert worst[0] <= tol, f"{group} gradient {worst[1]} off by {worst[0]:.2e} of its max |g| (bound {tol:.0e})"


def test_float64_run_is_the_fp32_path_op_for_op(steps):
    """The float64 evaluation runs the same aten ops on the same shapes as the fp32 fast path (no branch on the dtype
    takes another path), so it is a reference for that path and not for some other computation."""
    ops32, ops64 = steps["fast32"]["ops"], steps["fast64"]["ops"]
    first = next((i for i, (a, b) in enumerate(zip(ops32, ops64)) if a != b), None)
    assert first is None and len(ops32) == len(ops64), \
        f"op {first}: {ops32[first] if first is not None else len(ops32)} vs {ops64[first] if first is not None else len(ops64)}"


def test_fast_step_equals_the_slow_path(steps):
    """In float64 every loss term, D scalar and gradient of the two paths agree to float64 rounding (F64_REL)."""
    fast, slow = steps["fast64"], steps["slow64"]
    assert set(fast["terms"]) == set(slow["terms"]) and {"gan", "id", "mv_id", "lpips_image", "feature"} <= set(fast["terms"])
    assert rel_err(fast["loss"], slow["loss"]) <= F64_REL
    for k, v in {**slow["terms"], **slow["logs"]}.items():
        got = {**fast["terms"], **fast["logs"]}[k]
        assert rel_err(got, v) <= F64_REL, (k, got, v)
    _assert_grads_close(fast["grads"], slow["grads"], F64_REL)


def _fp32_tolerance(name: str, ref: float, r1_gamma: float, r1: float) -> float:
    """The absolute error an fp32 evaluation of the quantity `name` (float64 value `ref`) can have.

    - identity terms (1 − cos of nearly identical faces, ~2e-5): the cosine is resolved to ~EPS32 in fp32 and the
      normalisations add a few roundings: 8·EPS32 absolute, whatever the value;
    - LPIPS terms (~2e-5, distances of nearly identical images): the unit-normalised features (|f| ≈ 1) carry ~EPS32
      of rounding each after a few layers; LPIPS sums squared differences d² with |d| ≈ √v, so its relative error is
      ≈ 2·L·EPS32/√v with L ≈ 4 roundings: 8·EPS32·√v absolute;
    - R1 (a squared gradient norm, a derivative through the D's kinks): R1_REL relative; D/loss_real = softplus term +
      γ/2·R1 carries R1's share of it;
    - every other term and scalar (means of O(1) values, logits): SUM_REL relative.
    """
    if name in ("id", "mv_id"):
        return 8 * EPS32
    if name.startswith(("lpips", "mv_lpips")):
        return 8 * EPS32 * math.sqrt(abs(ref))
    if name == "D/r1":
        return R1_REL * abs(ref)
    if name == "D/loss_real":
        return SUM_REL * abs(ref) + r1_gamma / 2 * R1_REL * abs(r1)
    return SUM_REL * abs(ref)


def test_fast_step_in_fp32_is_within_fp32_error_of_float64(steps):
    """The fast path in fp32 against its float64 evaluation: every term and D scalar within `_fp32_tolerance`, the
    total loss within SUM_REL plus its terms' share, the gradients within GRAD_REL of each tensor's max |g|."""
    got, ref = steps["fast32"], steps["fast64"]
    r1 = ref["logs"]["D/r1"]
    budget = 0.0
    for k, v in {**ref["terms"], **ref["logs"]}.items():
        a = {**got["terms"], **got["logs"]}[k]
        tol = _fp32_tolerance(k, v, ref["r1_gamma"], r1)
        assert abs(a - v) <= tol, f"{k}: fp32 {a!r} vs float64 {v!r}: error {abs(a - v):.2e} > bound {tol:.2e}"
        budget += tol
    assert abs(got["loss"] - ref["loss"]) <= SUM_REL * abs(ref["loss"]) + budget
    _assert_grads_close(got["grads"], ref["grads"], GRAD_REL)


def test_d_real_side_runs_before_the_student(steps):
    """The D's real+R1 forward/backward happens before the student's forward, so its double-backward graph is
    freed before the student's render graph is built; the fake and generator-side D calls come after it."""
    assert steps["fast32"]["calls"] == ["D", "student", "D", "D"]


def test_frozen_renderer_uses_folded_weights_under_grad(monkeypatch):
    """A frozen renderer rendering a triplane that needs gradients runs its super-resolution on the folded weights
    (no modulated convolution), and in float64 its image and the gradient reaching the triplane equal the modulated
    path's (F64_REL; in fp32 the two differ by rounding, and the gradient also by the super-resolution's kinks)."""
    from models.eg3d import stylegan2
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from utils.cameras import look_at_cameras

    torch.manual_seed(0)
    r = to_float64(TriplaneRenderer(RendererConfig.tiny()).eval().requires_grad_(False))
    planes = (0.3 * torch.randn(2, 96, 32, 32)).double()
    cams = torch.cat([look_at_cameras(math.pi / 2, math.pi / 2), look_at_cameras(math.pi / 2 + 0.3, math.pi / 2)])
    calls = []
    real_modconv = stylegan2.modulated_conv2d
    monkeypatch.setattr(stylegan2, "modulated_conv2d", lambda *a, **k: calls.append(1) or real_modconv(*a, **k))

    results = []
    for fold in (True, False):
        monkeypatch.setattr(stylegan2, "FOLD_WITH_INPUT_GRAD", fold)
        calls.clear()
        p = planes.clone().requires_grad_(True)
        with Float64Mode():
            img = r(p, cams.double(), deterministic=True)["image"]
            img.square().mean().backward()
        results.append((img.detach(), p.grad, len(calls)))
    (img_f, g_f, n_f), (img_m, g_m, n_m) = results
    assert img_f.dtype == torch.float64 and n_f == 0 and n_m > 0
    assert rel_err(img_f, img_m) <= F64_REL and rel_err(g_f, g_m) <= F64_REL
