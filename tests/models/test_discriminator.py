"""EG3D dual discriminator and the 3DPE reference-conditioned variant: keys, shapes, forward, R1 gradients."""
from __future__ import annotations

import pytest
import torch

from models.discriminator import (DiscriminatorConfig, DualDiscriminator, EditingDualDiscriminator,
                                  MinibatchStdLayer)
from rounding import U32, assert_within, gamma32
from tests.conftest import read_key_list


@pytest.mark.parametrize("cls,tsv", [
    (EditingDualDiscriminator, "dual_discriminator_editing_state_dict.tsv"),
    (DualDiscriminator, "dual_discriminator_state_dict.tsv"),
])
def test_full_config_keys_match_original(cls, tsv, keys_dir):
    D = cls(DiscriminatorConfig())
    ours = [(k, tuple(v.shape)) for k, v in D.state_dict().items()]
    assert ours == read_key_list(keys_dir / tsv)  # names, shapes and order
    assert sum(p.numel() for p in D.parameters()) == 31_359_744


def test_loads_a_state_dict_built_from_the_key_list(keys_dir):
    rows = read_key_list(keys_dir / "dual_discriminator_editing_state_dict.tsv")
    sd = {k: torch.randn(s) if s else torch.randn(()) for k, s in rows}
    D = EditingDualDiscriminator(DiscriminatorConfig())
    D.load_state_dict(sd, strict=True)
    assert torch.equal(D.b512.conv0.resample_filter, sd["b512.conv0.resample_filter"])


def test_tiny_forward_and_r1_gradients():
    torch.manual_seed(0)
    D = EditingDualDiscriminator(DiscriminatorConfig.tiny(64))
    img = torch.rand(4, 3, 64, 64, requires_grad=True) * 2 - 1
    ref = (torch.rand(4, 3, 64, 64) * 2 - 1).requires_grad_(True)
    c = torch.randn(4, 25)
    logits = D(img, ref, c)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()
    g_img, g_ref = torch.autograd.grad(logits.sum(), [img, ref], create_graph=True)
    assert g_img.abs().sum() > 0 and g_ref.abs().sum() > 0
    (g_img.square().sum() + g_ref.square().sum()).backward()  # second order reaches the weights
    assert D.b64.fromrgb.weight.grad is not None and D.b64.fromrgb.weight.grad.abs().sum() > 0
    # the camera conditions the output; the reference matters
    assert not torch.allclose(D(img, ref, c), D(img, ref, torch.randn(4, 25)))
    assert not torch.allclose(D(img, ref, c), D(img, -ref, c))


def test_dual_discriminator_upsamples_raw():
    torch.manual_seed(0)
    D = DualDiscriminator(DiscriminatorConfig.tiny(32))
    out = D(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 8, 8), torch.randn(2, 25))
    assert out.shape == (2, 1)


def test_minibatch_std():
    x = torch.randn(4, 6, 4, 4)
    y = MinibatchStdLayer(group_size=2)(x)
    assert y.shape == (4, 7, 4, 4)
    grp = x.double().reshape(2, 2, 6, 4, 4)
    expected = ((grp - grp.mean(0)).square().mean(0) + 1e-8).sqrt().mean(dim=[1, 2, 3])
    # float32 vs the formula in float64: per element the deviation x − mean (2 roundings, absolute: it may cancel),
    # its square, the mean of 2, + 1e-8 and sqrt (≤ 3 more, relative): ≤ 5·U32·max|x|; then a mean of 96 positive
    # values, ≤ γ_96 relative (tests/rounding.py). Measured ≤ 0.021 of that bound (200 random inputs).
    tol = gamma32(96) * expected + 5 * U32 * float(x.abs().max())
    assert_within(y[:2, 6, 0, 0], expected, tol, "minibatch std")
    with pytest.raises(ValueError):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 2, 4, 4))
