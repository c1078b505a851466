"""One training step against the original code's (issue #14, part 1), and the keys that select its behaviour.

The first test runs our training step (`training.train.train_step`, built by `build_training`) on the recipe of
tests/training_parity.py and compares every loss term (1e-4 relative) and every gradient of the student's
trainable parameters and of the discriminator as its optimiser step sees them (1e-3 of the tensor's max |g|)
with the original's values in `<reference>/fixtures/training_parity.pt`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training_parity import (GRAD_TOL, RECIPE_VERSION, TERM_NAMES, TERM_TOL, compare, format_report,
                             load_parity_reference, our_training_step, write_recipe)

#: The fixture is in shared/reference/fixtures (made with the original's own step, see its README): CI fails when
#: it is missing; elsewhere the test skips with MISSING.
FIXTURE_SHIPPED = True
MISSING = ("training parity fixture not available: the original code's values for the recipe of "
           "tests/training_parity.py are not shipped yet (they go to <reference>/fixtures/training_parity.pt; "
           "THREEDPE_TRAINING_PARITY names another file). The figures measured so far are in docs/training.md.")


def test_training_step_matches_original(tmp_path):
    """Every term within 1e-4 relative; every gradient within 1e-3 of its tensor's max |g|."""
    import os

    ref = load_parity_reference()
    if ref is None:
        if FIXTURE_SHIPPED and os.environ.get("CI") == "true":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    assert ref["meta"]["recipe_version"] == RECIPE_VERSION, "the fixture was made for another recipe version"
    recipe = write_recipe(tmp_path / "recipe")
    batch = torch.load(recipe / "batch.pt", weights_only=True)
    for k, v in ref["recipe_check"].items():
        assert abs(float(batch[k].double().sum()) - v) <= 1e-6 * max(1.0, abs(v)), f"recipe input {k} changed"
    ours = our_training_step(recipe, tmp_path / "exp")
    # the random camera: ours (utils.cameras) against the original's eural_to_camera
    assert (ours["mv_camera"] - ref["mv_camera"]).abs().max() < 1e-6
    rep = compare(ours, ref)
    print(format_report(rep))
    assert set(rep["terms"]) == set(TERM_NAMES.values())
    bad = {k: v for k, v in rep["terms"].items() if v[2] > TERM_TOL}
    assert not bad, f"terms off by more than {TERM_TOL} relative (ours, original, rel): {bad}"
    for group in ("student_grads", "discriminator_grads"):
        g = rep[group]
        assert not g["missing"], f"{group}: tensors on one side only: {g['missing'][:5]}"
        off = {k: v for k, v in g["per_tensor"].items() if max(v) > GRAD_TOL}
        assert not off, f"{group}: {len(off)} tensors off by more than {GRAD_TOL}, e.g. {list(off.items())[:3]}"


# ----------------------------------------------------------------------------- keys for the original's behaviour
def test_one_camera_per_batch():
    """`loss.one_camera_per_batch` (the original) shares one random camera across the batch; the default draws
    one per sample, exactly as before."""
    from training.train import cameras_for
    from utils.cameras import sample_training_cameras

    batch = {"camera": torch.zeros(3, 25)}
    cams = cameras_for(batch, 2, torch.Generator().manual_seed(5), torch.device("cpu"), one_per_batch=True)
    assert cams.shape == (6, 25) and torch.equal(cams[3], cams[4]) and torch.equal(cams[4], cams[5])
    default = cameras_for(batch, 2, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(default[3:], sample_training_cameras(3, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(default[3], default[4])
    assert torch.equal(cameras_for(batch, 1, torch.Generator(), torch.device("cpu"), True), batch["camera"])


def test_frozen_dropout_covers_the_teacher():
    """`model.frozen_dropout: true` keeps the frozen parts AND the teacher in train mode (the original never puts
    either in eval); the default puts both in eval."""
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.live3d.encoder import Live3DConfig, Live3DEncoder
    from training.setup import set_modes

    student, teacher = EditingEncoder(EditingEncoderConfig.tiny()), Live3DEncoder(Live3DConfig.tiny("LT"))
    set_modes(student, ["Final_encoder", "Ref_encoder"], True, teacher=teacher)
    assert teacher.training and student.decoder.training and student.Final_encoder.training
    set_modes(student, ["Final_encoder", "Ref_encoder"], False, teacher=teacher)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not student.decoder.training and student.Final_encoder.training


def test_identity_crop_is_the_originals():
    """The ID net sees the original's crop: bilinear 256 WITHOUT antialiasing, rows 35:223, columns 32:220,
    average-pooled to 112."""
    from models.arcface import IdentityEncoder, IRSE50

    torch.manual_seed(0)
    enc = IdentityEncoder(IRSE50(width=16, units=(1, 1, 1, 1))).eval()
    x = torch.rand(2, 3, 512, 512) * 2 - 1
    crop = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)[:, :, 35:223, 32:220]
    with torch.no_grad():
        assert torch.allclose(enc(x), enc.net(F.adaptive_avg_pool2d(crop, (112, 112))), atol=1e-6)
