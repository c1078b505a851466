"""bf16 training (`bf16=true`: autocast over the encoders and the renderer) on tiny models on CPU: it runs,
every logged loss is finite, the checkpoint and the final snapshot / 3dpe.pt load back with the trained weights."""
from __future__ import annotations

import math

import torch

from tests.models.eg3d.test_bf16_full_size import node_names
from tests.training.test_training import _events, make_tiny_dataset, tiny_config


def test_bf16_training_runs_and_its_checkpoints_load(tmp_path):
    from models.checkpoint import build_models, load_checkpoint
    from models.discriminator import DiscriminatorConfig
    from training.train import main

    data = make_tiny_dataset(tmp_path / "data", n_portraits=4)
    cfg = tiny_config(data, tmp_path / "exps", "bf16", "bf16=true", "max_steps=3", "gan.start_step=0",
                      "data.val_fraction=0.0", "log.save_interval=2", "log.val_interval=1000",
                      "log.image_interval=1000")
    res = main(cfg)
    assert res.step == 3 and not res.stopped

    acc = _events(res.run_dir)
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(("loss/", "D/"))]
    assert {"loss/total", "loss/gan", "loss/lpips_image", "D/loss_real", "D/loss_fake"} <= set(tags)
    for k in tags:
        values = [e.value for e in acc.Scalars(k)]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (k, values)
    # the weights stay fp32 (autocast casts per op), so the saved weights are fp32 and finite
    trained = res.encoder.state_dict()
    assert all(v.dtype != torch.bfloat16 for v in trained.values())

    tiny = {**load_checkpoint(res.run_dir / "final").configs, "discriminator": DiscriminatorConfig.tiny(64)}
    for path in (res.run_dir / "checkpoints" / "step_00000002", res.run_dir / "final", res.run_dir / "3dpe.pt"):
        ckpt = load_checkpoint(path, configs=tiny if path.suffix == ".pt" else None)
        enc = build_models(ckpt)["encoder"].state_dict()
        if path.name != "step_00000002":
            assert all(torch.equal(enc[k], trained[k].cpu()) for k in trained), path
        assert all(torch.isfinite(v).all() for v in enc.values() if v.is_floating_point()), path


def test_bf16_checkpointed_rendering_gives_the_same_gradients():
    """`model.render_chunk` under bf16 autocast: the renderer replayed in backward (activation checkpointing) runs
    in the same dtypes as its first pass (the recomputed tensors' metadata must match), the student's render goes
    through `FrozenDecode`, and the encoder's gradients equal those without checkpointing up to bf16 rounding."""
    from tests.training.test_training import tiny_student_problem
    from training.student import Student

    enc, ren, params, (img, ref, cams) = tiny_student_problem()
    grads = []
    for chunk in (0, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tri, views = Student(enc, ren, render_chunk=chunk)(img, ref, cams, deterministic=True)
        assert views["image"].dtype == views["image_raw"].dtype == torch.float32
        loss = sum(v.float().square().mean() for v in views.values()) + tri.float().abs().mean()
        if chunk == 0:
            assert "FrozenDecodeBackward" in node_names(loss)
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5 * float(b.abs().max()))

