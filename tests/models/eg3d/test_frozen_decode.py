"""The student's renders in training recompute the triplane lookup and the frozen decoder in backward
(`FrozenDecode`, `CompositeColours` in models/eg3d/renderer.py) instead of keeping their activations (issue #15):
the same images, the same triplane gradients as plain autograd, and a much smaller saved graph."""
from __future__ import annotations

import pytest
import torch

from models.eg3d import renderer as renderer_module
from models.eg3d.config import RendererConfig
from models.eg3d.triplane_renderer import TriplaneRenderer
from utils.cameras import sample_training_cameras

# The two paths' forward values are bit-identical (asserted below: the same ops on the same inputs), so every kink
# (the super-resolution's leaky ReLUs, the loss's abs, the depth clamp) takes the same slope in both, and their
# gradients differ only by the rounding of the decoder's backward, by hand (FrozenDecode, CompositeColours) or by
# autograd. Per triplane texel: sums over the colour outputs (33), the hidden layer (64) and the samples reading that
# texel (≤ 200 here), and ~5 elementwise roundings: ≲ EPS32·(√33 + √64 + √200 + 5) = 3.9e-6 of max |g| a path
# (tests/rounding.py's statistical bound), 7.8e-6 for their difference, on any CPU. Measured 1.5e-7 to 3.2e-7.
# (No float64 reference: the recomputing path runs for float32 triplanes only.)
GRAD_REL = 1e-5


def _render(r: TriplaneRenderer, planes: torch.Tensor, cams: torch.Tensor, recompute: bool, seed: int | None):
    """Renders of `planes` (a fresh leaf) and its gradient under a loss on every output, with or without
    the recomputing path; `seed`: random sampling from that seed (None: deterministic)."""
    saved = renderer_module.RECOMPUTE_FROZEN_DECODE
    renderer_module.RECOMPUTE_FROZEN_DECODE = recompute
    try:
        p = planes.clone().requires_grad_(True)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        out = r(p, cams, deterministic=seed is None, generator=gen)
        loss = (out["image"].square().mean() + out["feature_image"].abs().mean()
                + out["image_raw"].mean() + out["image_depth"].mean())
        loss.backward()
    finally:
        renderer_module.RECOMPUTE_FROZEN_DECODE = saved
    return out, p.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("n_planes", [1, 2])
def test_same_renders_and_gradients_as_autograd(seed, n_planes):
    torch.manual_seed(0)
    r = TriplaneRenderer(RendererConfig.tiny()).eval().requires_grad_(False)
    planes = 0.5 * torch.randn(n_planes, 96, 32, 32)
    cams = sample_training_cameras(2, generator=torch.Generator().manual_seed(1))
    fast, g_fast = _render(r, planes, cams, True, seed)
    ref, g_ref = _render(r, planes, cams, False, seed)
    for k in ref:
        assert torch.equal(fast[k].detach(), ref[k].detach()), k
    assert _rel(g_fast, g_ref) <= GRAD_REL


def test_softplus_above_its_threshold():
    """Hidden pre-activations above 20 (Softplus is the identity there): the recomputed derivative is 1 too."""
    torch.manual_seed(0)
    r = TriplaneRenderer(RendererConfig.tiny()).eval().requires_grad_(False)
    with torch.no_grad():
        r.decoder.net[0].bias.add_(25.0)
    planes = 0.5 * torch.randn(1, 96, 32, 32)
    cams = sample_training_cameras(2, generator=torch.Generator().manual_seed(1))
    fast, g_fast = _render(r, planes, cams, True, None)
    ref, g_ref = _render(r, planes, cams, False, None)
    assert torch.equal(fast["feature_image"].detach(), ref["feature_image"].detach())
    assert _rel(g_fast, g_ref) <= GRAD_REL


def test_trainable_decoder_keeps_plain_autograd():
    """A decoder that needs gradients (never the case in 3DPE training, but supported) still gets them."""
    torch.manual_seed(0)
    r = TriplaneRenderer(RendererConfig.tiny()).eval()
    planes = (0.5 * torch.randn(1, 96, 32, 32)).requires_grad_(True)
    out = r(planes, sample_training_cameras(1, generator=torch.Generator().manual_seed(1)))
    out["image_raw"].mean().backward()
    assert r.decoder.net[0].weight.grad is not None and r.decoder.net[0].weight.grad.abs().sum() > 0


def test_saved_graph_is_much_smaller():
    """The neural-rendering part's saved tensors (bytes of distinct storages) shrink at least 4×."""
    torch.manual_seed(0)
    r = TriplaneRenderer(RendererConfig.tiny()).eval().requires_grad_(False)
    planes = 0.5 * torch.randn(2, 96, 32, 32)
    cams = sample_training_cameras(2, generator=torch.Generator().manual_seed(1))

    def saved_bytes(recompute: bool) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        saved = renderer_module.RECOMPUTE_FROZEN_DECODE
        renderer_module.RECOMPUTE_FROZEN_DECODE = recompute
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                r.render_features(planes.clone().requires_grad_(True), cams, deterministic=False,
                                  neural_rendering_resolution=32)
        finally:
            renderer_module.RECOMPUTE_FROZEN_DECODE = saved
        return sum(seen.values())

    small, large = saved_bytes(True), saved_bytes(False)
    assert small * 4 <= large, (small, large)
