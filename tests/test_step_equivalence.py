"""The faster training step computes what the plain step computes (issue #15): every loss term, the D scalars and
every gradient the two optimisers see agree within 1e-5 relative with a recomputation on the slow path
(the order of the original step: distillation, then the whole D step; the frozen renderer's super-resolution on
modulated weights; the discriminator's layers with separate bias, activation and gain passes; plain autograd through
the student's triplane lookups and decoder), on tiny models with deterministic rendering, every loss term on and
the GAN from step 0."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from test_training import make_tiny_dataset, tiny_config

REL = 1e-5
TERMS_ON = ["loss.feature=0.3", "loss.id=0.1", "gan.start_step=0", "loss.one_camera_per_batch=false",
            "data.val_fraction=0.0", "model.render_chunk=0"]


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


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both vanish)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 1e-12 else float((a - b).abs().max())


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """One step of the fast path (recording the order of D and student calls) and one of the slow path, from
    identical setups."""
    from models.eg3d import renderer, stylegan2
    from training.train import train_step

    tmp = tmp_path_factory.mktemp("equivalence")
    s_fast, cfg, batch, cams = _setup(tmp / "fast", "fast")
    got_fast, hooks = _capture(s_fast)
    calls: list[str] = []
    hooks += [s_fast.D.register_forward_hook(lambda m, a, o: calls.append("D")),
              s_fast.encoder.register_forward_hook(lambda m, a, o: calls.append("student"))]
    out = train_step(s_fast, cfg, batch, cams, 0, contextlib.nullcontext, deterministic=True)
    [h.remove() for h in hooks]

    saved = stylegan2.FOLD_WITH_INPUT_GRAD, stylegan2.FOLD_CONV_GAIN, renderer.RECOMPUTE_FROZEN_DECODE
    stylegan2.FOLD_WITH_INPUT_GRAD = stylegan2.FOLD_CONV_GAIN = renderer.RECOMPUTE_FROZEN_DECODE = False
    try:
        s_slow, cfg2, batch2, cams2 = _setup(tmp / "slow", "slow")
        assert torch.equal(batch["input"], batch2["input"]) and torch.equal(cams, cams2)
        got_slow, hooks = _capture(s_slow)
        loss, terms, logs = slow_step(s_slow, cfg2, batch2, cams2)
        [h.remove() for h in hooks]
    finally:
        stylegan2.FOLD_WITH_INPUT_GRAD, stylegan2.FOLD_CONV_GAIN, renderer.RECOMPUTE_FROZEN_DECODE = saved
    return {"fast": (out, got_fast, s_fast), "slow": (loss, terms, logs, got_slow, s_slow), "calls": calls}


def test_fast_step_equals_the_slow_path(steps):
    """Terms within 1e-5 relative (+1e-9 absolute: LPIPS of near-identical tiny renders is ~1e-5 itself, and the
    folded super-resolution differs from the modulated one by float rounding; the identity terms are 1 − cos of
    near-identical faces, ~2e-5, where one float32 step of the cosine (6e-8) is the resolution: + eps there);
    gradients within 1e-5 of each tensor's max |g| (the updated parameters are not compared: Adam's first step is
    lr·sign(g), which turns the rounding noise of near-zero gradients into ±lr)."""
    out, got_fast, s_fast = steps["fast"]
    loss, terms, logs, got_slow, s_slow = steps["slow"]
    assert set(out.terms) == set(terms) and {"gan", "id", "mv_id", "lpips_image", "feature"} <= set(terms)
    assert abs(float(out.loss.detach()) - float(loss.detach())) <= REL * abs(float(loss.detach()))
    for k, v in terms.items():
        a, b = float(out.terms[k].detach()), float(v.detach())
        atol = torch.finfo(torch.float32).eps if k in ("id", "mv_id") else 1e-9
        assert abs(a - b) <= REL * abs(b) + atol, (k, a, b)
    for k, v in logs.items():
        assert abs(out.logs[k] - v) <= REL * abs(v) + 1e-9, (k, out.logs[k], v)
    for group in ("student", "D"):
        assert set(got_fast[group]) == set(got_slow[group]) and got_slow[group], group
        worst = max((_close(got_fast[group][k], g), k) for k, g in got_slow[group].items())
        assert worst[0] <= REL, f"{group} gradient {worst[1]} off by {worst[0]:.2e} relative"


def test_d_real_side_runs_before_the_student(steps):
    """The D's real+R1 forward/backward happens before the student's forward, so its double-backward graph is
    freed before the student's render graph is built; the fake and generator-side D calls come after it."""
    assert steps["calls"] == ["D", "student", "D", "D"]


def test_frozen_renderer_uses_folded_weights_under_grad(monkeypatch):
    """A frozen renderer rendering a triplane that needs gradients runs its super-resolution on the folded weights
    (no modulated convolution), and the gradient reaching the triplane matches the modulated path."""
    import math

    from models.eg3d import stylegan2
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from utils.cameras import look_at_cameras

    torch.manual_seed(0)
    r = TriplaneRenderer(RendererConfig.tiny()).eval().requires_grad_(False)
    planes = (0.3 * torch.randn(2, 96, 32, 32))
    cams = torch.cat([look_at_cameras(math.pi / 2, math.pi / 2), look_at_cameras(math.pi / 2 + 0.3, math.pi / 2)])
    calls = []
    real_modconv = stylegan2.modulated_conv2d
    monkeypatch.setattr(stylegan2, "modulated_conv2d", lambda *a, **k: calls.append(1) or real_modconv(*a, **k))

    results = []
    for fold in (True, False):
        monkeypatch.setattr(stylegan2, "FOLD_WITH_INPUT_GRAD", fold)
        calls.clear()
        p = planes.clone().requires_grad_(True)
        img = r(p, cams, deterministic=True)["image"]
        img.square().mean().backward()
        results.append((img.detach(), p.grad, len(calls)))
    (img_f, g_f, n_f), (img_m, g_m, n_m) = results
    assert n_f == 0 and n_m > 0
    assert _close(img_f, img_m) <= REL and _close(g_f, g_m) <= REL
