"""The training loop on tiny models: exact resume, frozen parts, falling loss, TensorBoard tags,
loadable snapshots, and a 2-process gloo DDP run whose ranks stay identical."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from float64 import Float64Mode, rel_err, to_float64
from rounding import F64_REL, forward_rel

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "train_tiny.yaml"
# The tiny editing encoder's triplane in float32 vs its float64 evaluation, relative to the largest |value|
# (tests/rounding.py, as in tests/models/editing/test_editing_encoder.py): ≤ 50 products in a row (ResNet, ASPP, transformers,
# prompt encoder, fuser, head) of ≤ 864 terms; measured 7.6e-6 with the tiny CLIP prompt encoder.
TINY_EDIT_FP32_REL = forward_rel(50, 864)  # 1.8e-4


def make_tiny_dataset(root: Path, n_portraits: int = 6, styles=("anime", "zombie"), res: int = 64,
                      seed: int = 0) -> Path:
    """EG3D/3DPE layout: dataset.json + <dir>/<file>.png + <dir>_<style>/<file>.png (no '_' in names)."""
    from utils.cameras import look_at_cameras

    rng = np.random.default_rng(seed)
    labels = []
    yy, xx = np.mgrid[0:res, 0:res] / res
    for i in range(n_portraits):
        d, name = f"{i // 4:05d}", f"img{i:08d}.png"
        base = rng.uniform(30, 220, size=(1, 1, 3))
        img = np.clip(base * (0.5 + 0.5 * np.stack([yy, xx, 1 - yy], -1)) + rng.normal(0, 8, (res, res, 3)), 0, 255)
        (root / d).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(root / d / name)
        for k, style in enumerate(styles):
            (root / f"{d}_{style}").mkdir(parents=True, exist_ok=True)
            edited = np.clip(img * (0.6 + 0.3 * k) + 40 * k, 0, 255)
            Image.fromarray(edited.astype(np.uint8)).save(root / f"{d}_{style}" / name)
        cam = look_at_cameras(math.pi / 2 + rng.uniform(-0.2, 0.2), math.pi / 2 + rng.uniform(-0.1, 0.1))
        labels.append([f"{d}/{name}", cam[0].tolist()])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def tiny_config(data: Path, exp: Path, name: str, *overrides: str):
    from training.train import TrainConfig
    from utils.config import load_config

    return load_config(TrainConfig, TINY, [f"data.train_root={data}", f"exp_dir={exp}", f"name={name}", *overrides])


@contextlib.contextmanager
def sigterm_at_step(k: int) -> Iterator[None]:
    """SIGTERM this process as the loop starts step `k` (1-based), from outside the product code, as a
    cluster's scheduler would: the loop's StopOnSignal finishes step k, saves it and stops."""
    import training.train as tt

    real = tt.train_step

    def step(s, cfg, batch, cams, done, *rest, **kw):  # `done`: the steps finished before this one
        if done + 1 == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(s, cfg, batch, cams, done, *rest, **kw)

    tt.train_step = step
    try:
        yield
    finally:
        tt.train_step = real


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run, and the same run stopped after step 2 and resumed.

    4 portraits, 1 held out → 6 pairs → 3 steps per epoch: the resumed part crosses an epoch boundary.
    """
    from training.train import main

    tmp = tmp_path_factory.mktemp("train")
    data = make_tiny_dataset(tmp / "data", n_portraits=4)
    full = main(tiny_config(data, tmp / "exps", "full"))
    with sigterm_at_step(2):  # stopped after step 2, as a scheduler stops a job
        stopped = main(tiny_config(data, tmp / "exps", "resumed"))
    stopped_state = _state(stopped.encoder)
    resumed = main(tiny_config(data, tmp / "exps", "resumed", "resume=auto"))
    return {"data": data, "tmp": tmp, "full": full, "stopped": stopped, "resumed": resumed,
            "stopped_state": stopped_state}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_is_bit_exact(runs):
    full, stopped, resumed = runs["full"], runs["stopped"], runs["resumed"]
    assert stopped.stopped and stopped.step == 2 and resumed.step == 4 and full.step == 4
    assert stopped.signal == signal.SIGTERM and not resumed.stopped
    a, b = _state(full.encoder), _state(resumed.encoder)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "student differs after resume"
    da, db = _state(full.discriminator), _state(resumed.discriminator)
    assert all(torch.equal(da[k], db[k]) for k in da), "discriminator differs after resume"
    # and training did something between step 2 and 4
    s2 = runs["stopped_state"]
    assert any(not torch.equal(s2[k], a[k]) for k in a if k.startswith("Final_encoder."))
    # keep_last=2: of the stop/resume run's checkpoints 2 and 4, both remain; no temporary folders
    names = sorted(p.name for p in (resumed.run_dir / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004"]


def test_frozen_parts_do_not_change(runs):
    from training.setup import build_networks

    cfg = tiny_config(runs["data"], runs["tmp"] / "exps", "full")
    torch.manual_seed(cfg.seed)
    init = build_networks(cfg)
    before, after = _state(init["student"]), _state(runs["full"].encoder)
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("Final_encoder.", "Ref_encoder.")):
            continue
        assert same, f"frozen parameter {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("Final_encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("Ref_encoder."))
    r0, r1 = _state(init["renderer"]), _state(runs["full"].renderer)
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the renderer changed"
    assert not any(p.requires_grad for p in runs["full"].renderer.parameters())
    enc = runs["full"].encoder
    assert not any(p.requires_grad for n, p in enc.named_parameters() if n.startswith(("encoder.", "decoder.",
                                                                                         "F_encoder.", "EHigh_encoder.")))


def test_tensorboard_has_the_promised_tags(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["full"].run_dir / "logs"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    view = ["l1_image", "l1_raw", "lpips_image", "lpips_raw", "depth", "feature"]
    expected = {"loss/total", "loss/tri", "loss/gan", *(f"loss/{t}" for t in view), *(f"loss/mv_{t}" for t in view),
                "D/logits_real", "D/logits_fake", "D/loss_real", "D/loss_fake", "D/r1",
                "lr/student", "lr/discriminator", "val/total", "val/tri", "val/lpips_image"}
    assert expected <= scalars, expected - scalars
    assert "loss/id" not in scalars  # weight 0: never computed
    assert {"train/grid", "val/grid"} <= images
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    assert acc.Scalars("lr/student")[0].value == pytest.approx(1e-4)


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_after_resume_keeps_the_checkpointed_step(runs):
    """Stopped after step 2 (checkpoint 2), resumed: the logs hold every step once, step 2 included."""
    full, resumed = _events(runs["full"].run_dir), _events(runs["resumed"].run_dir)
    for tag in ("loss/total", "loss/tri", "lr/student"):
        got, want = resumed.Scalars(tag), full.Scalars(tag)
        assert [e.step for e in got] == [1, 2, 3, 4], tag
        assert [e.value for e in got] == [e.value for e in want], tag  # exact resume: the same numbers
    assert [e.step for e in resumed.Images("train/grid")] == [2, 4]
    assert [e.step for e in resumed.Images("val/grid")] == [2, 4]
    assert [e.step for e in resumed.Scalars("val/total")] == [2, 4]


def test_tensorboard_after_resume_drops_the_steps_past_the_checkpoint(tmp_path):
    """Killed after step 3 with checkpoint 2 the newest: the resumed run's logs hold step 3 once, not twice."""
    import shutil

    from training.train import main

    data = make_tiny_dataset(tmp_path / "data", n_portraits=2, styles=("anime",))
    common = ["data.val_fraction=0", "gan.enabled=false", "loss.multiview=false", "export_3dpe=false",
              "log.image_interval=1000", "log.val_interval=1000"]
    main(tiny_config(data, tmp_path / "exps", "killed", *common, "max_steps=3"))
    ckpts = tmp_path / "exps" / "killed" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000003")  # as if killed between logging step 3 and saving it
    resumed = main(tiny_config(data, tmp_path / "exps", "killed", *common, "max_steps=3", "resume=auto"))
    assert resumed.step == 3
    assert [e.step for e in _events(resumed.run_dir).Scalars("loss/total")] == [1, 2, 3]


def test_snapshots_load_back(runs):
    from models.checkpoint import build_models, load_checkpoint
    from models.discriminator import DiscriminatorConfig

    run_dir = runs["full"].run_dir
    assert (run_dir / "config.yaml").is_file()
    # 3dpe.pt records no architecture: the run's tiny one (train_tiny.yaml: the D of a 64² renderer)
    tiny = {**load_checkpoint(run_dir / "final").configs, "discriminator": DiscriminatorConfig.tiny(64)}
    for path in (run_dir / "final", run_dir / "3dpe.pt", run_dir / "checkpoints" / "step_00000004"):
        ckpt = load_checkpoint(path, configs=tiny if path.suffix == ".pt" else None)
        models = build_models(ckpt)
        assert {"encoder", "renderer"} <= set(models)
        sd = models["encoder"].state_dict()
        ref = runs["full"].encoder.state_dict()
        assert all(torch.equal(sd[k], ref[k].cpu()) for k in ref)
    from pipelines.editor import PortraitEditor

    editor = PortraitEditor.from_pretrained(run_dir / "final", device="cpu")
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    prompt = editor.encode_prompt(reference=img)
    planes = editor.edit(img, prompt)
    assert planes.shape == (1, 96, 32, 32) and torch.isfinite(planes).all()


def test_loss_falls_when_overfitting(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.train import main

    data = make_tiny_dataset(tmp_path / "data", n_portraits=1, styles=("anime",))
    cfg = tiny_config(data, tmp_path / "exps", "overfit", "max_steps=20", "epochs=100", "data.val_fraction=0",
                      "data.batch_size=1", "optim.lr=1e-3", "gan.enabled=false", "loss.multiview=false",
                      "log.val_interval=1000", "log.save_interval=1000", "log.image_interval=1000",
                      "export_3dpe=false")
    res = main(cfg)
    acc = EventAccumulator(str(res.run_dir / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss/total")]
    assert len(losses) == 20
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:3]), losses


DRIVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    from training.train import TrainConfig, main
    from training.state import trainable_state
    from utils.config import load_config
    cfg = load_config(TrainConfig, {tiny!r}, sys.argv[1:])
    res = main(cfg)
    rank = int(os.environ["RANK"])
    torch.save({{"student": trainable_state(res.encoder), "D": res.discriminator.state_dict(),
                 "world": torch.distributed.get_world_size()}}, os.path.join(cfg.exp_dir, f"rank{{rank}}.pt"))
    torch.distributed.destroy_process_group()
""")


def test_two_process_gloo_ranks_stay_identical(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_portraits=8)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), tiny=str(TINY)))
    exp = tmp_path / "exps"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           f"data.train_root={data}", f"exp_dir={exp}", "name=ddp", "max_steps=3", "log.save_interval=3",
           "log.val_interval=3", "export_3dpe=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # DDP is built the modern way (no deprecated broadcast_buffers) and every gradient has its bucket's strides
    for warning in ("broadcast_buffers", "Grad strides do not match bucket view strides"):
        assert warning not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    r0, r1 = torch.load(exp / "rank0.pt"), torch.load(exp / "rank1.pt")
    assert r0["world"] == 2
    assert all(torch.equal(r0["student"][k], r1["student"][k]) for k in r0["student"])
    assert all(torch.equal(r0["D"][k], r1["D"][k]) for k in r0["D"])
    state = torch.load(exp / "ddp" / "checkpoints" / "step_00000003" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # both ranks' RNG streams are saved
    # the ranks saw different data and different cameras, so their RNG streams differ
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def tiny_student_problem():
    """A tiny student (its prompt branch and fusion trainable, eval mode) and frozen renderer built from seed 0, two
    inputs and references, and 4 cameras (two views of each): (encoder, renderer, trainable params, (img, ref, cams))."""
    from training.setup import TrainConfig, build_networks, set_trainable
    from utils.cameras import sample_training_cameras

    cfg = TrainConfig()
    cfg.model.tiny, cfg.model.init_checkpoint = True, ""
    torch.manual_seed(0)
    nets = build_networks(cfg)
    enc, ren = nets["student"], nets["renderer"].eval().requires_grad_(False)
    params = set_trainable(enc, ["Final_encoder", "Ref_encoder"])
    enc.eval()
    img, ref = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    cams = torch.cat([sample_training_cameras(2, torch.Generator().manual_seed(0)) for _ in range(2)])
    return enc, ren, params, (img, ref, cams)


def test_checkpointed_rendering_gives_the_same_gradients(monkeypatch):
    """render_chunk=1 renders each view in its own activation-checkpointed call: the same gradients as the same
    chunks without checkpointing (the same ops: bit-equal) and, in float64, as one batched render (render_chunk=0;
    F64_REL). Float32 gradients of the two renders are not compared: another batching may round a pre-activation
    to the other side of a ReLU or clamp, which switches that slope. The float64 chunks run without checkpointing,
    whose backward recomputation runs outside `Float64Mode`."""
    import copy

    import torch.utils.checkpoint

    from training.student import Student

    enc, ren, params, (img, ref, cams) = tiny_student_problem()

    def grads(enc, ren, inputs, chunk: int) -> tuple[torch.Tensor, ...]:
        tri, views = Student(enc, ren, render_chunk=chunk)(*inputs, deterministic=True)
        loss = sum(v.square().mean() for v in views.values()) + tri.abs().mean()
        return torch.autograd.grad(loss, [p for p in enc.parameters() if p.requires_grad])

    checkpointed = grads(enc, ren, (img, ref, cams), 1)
    enc64, ren64 = to_float64(copy.deepcopy(enc)), to_float64(copy.deepcopy(ren))
    calls = []
    with monkeypatch.context() as m:  # the same chunks, each rendered once and kept for backward
        m.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *args, **kw: calls.append(1) or fn(*args))
        plain = grads(enc, ren, (img, ref, cams), 1)
        with Float64Mode():
            batched64 = grads(enc64, ren64, to_float64((img, ref, cams)), 0)
            chunked64 = grads(enc64, ren64, to_float64((img, ref, cams)), 1)
    assert len(calls) == 2 * 4 and len(checkpointed) == len(params)  # 4 views, one chunk each, twice
    assert all(torch.equal(a, b) for a, b in zip(checkpointed, plain))
    assert max(rel_err(a, b) for a, b in zip(chunked64, batched64)) <= F64_REL  # measured 0


def test_loss_nets_name_missing_weights(tmp_path):
    from training.losses import ALEXNET_URL, DistillationLoss, IDLoss, LossConfig, build_lpips
    from utils.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="alexnet-owt") as e:
        build_lpips(tmp_path)
    assert ALEXNET_URL in str(e.value)
    with pytest.raises(MissingWeightsError, match="model_ir_se50.pth"):
        IDLoss(tmp_path)
    crit = DistillationLoss(LossConfig(weights_dir=str(tmp_path)), random_nets=True)
    assert crit.id_loss is None  # weight 0: the ID net is never built


def test_clip_student_takes_text_or_reference_per_sample():
    """With the CLIP prompt encoder each sample attends to exactly one prompt: its text or its reference."""
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from training.student import Student

    torch.manual_seed(0)
    enc = EditingEncoder(EditingEncoderConfig.tiny("clip")).eval()
    student = Student(enc, TriplaneRenderer(RendererConfig.tiny()).eval())
    side = enc.config.input_resolution
    img = torch.rand(2, 3, side, side) * 2 - 1
    ref = torch.rand(2, 3, side, side) * 2 - 1
    texts = ["make it gold", "a zombie"]
    with torch.no_grad():
        tokens, bias = student.prompt_tokens(ref, texts, torch.tensor([True, False]))
        mixed = enc(img, tokens, bias)
        t_tok, t_bias = enc.encode_prompt(text=texts[:1])
        i_tok, i_bias = enc.encode_prompt(reference=ref[1:])
        want_text = enc(img[:1], t_tok, t_bias)
        want_image = enc(img[1:], i_tok, i_bias)
    # Both are float32 evaluations of the same maths (a masked prompt adds exact zeros), in another batching: each is
    # within TINY_EDIT_FP32_REL of the float64 value, so within twice that of each other on any CPU (measured 1.6e-6
    # and 1.7e-6; a leaking or misplaced prompt moves the triplane by ~0.7, see the last line). Their float64
    # evaluations agree to 2e-15, but would triple this test's time (float64 convolutions have no fast CPU kernel).
    assert rel_err(mixed[:1], want_text) <= 2 * TINY_EDIT_FP32_REL
    assert rel_err(mixed[1:], want_image) <= 2 * TINY_EDIT_FP32_REL
    assert not torch.allclose(want_text, enc(img[:1], *enc.encode_prompt(reference=ref[:1])), atol=1e-4)


def test_clip_prompt_training_runs_and_reloads(tmp_path):
    """The loop with the CLIP prompt encoder (text or reference per sample) runs; its snapshot reloads as CLIP."""
    from models.checkpoint import build_models, load_checkpoint
    from training.train import main

    data = make_tiny_dataset(tmp_path / "data", n_portraits=2, styles=("anime",))
    cfg = tiny_config(data, tmp_path / "exps", "clip", "model.prompt_encoder=clip", "max_steps=12", "epochs=100",
                      "data.val_fraction=0", "data.batch_size=2", "optim.lr=1e-3", "gan.enabled=false",
                      "loss.multiview=false", "log.val_interval=1000", "log.save_interval=1000",
                      "log.image_interval=1000", "export_3dpe=false")
    res = main(cfg)
    models = build_models(load_checkpoint(res.run_dir / "final"))
    assert models["encoder"].config.prompt_encoder == "clip"


def test_infinite_sampler_walks_the_epochs_in_whole_batches_from_any_start():
    """Each epoch is the rank's DistributedSampler share cut to whole batches; a stream started at
    (epoch, batch) is exactly the tail of the stream started at (0, 0)."""
    from itertools import islice

    from torch.utils.data import DistributedSampler

    from training.setup import InfiniteSampler

    data, batch, epochs = list(range(13)), 2, 4  # 2 ranks: 7 items each, 3 whole batches, 1 dropped per epoch
    for rank in (0, 1):
        expected = []
        for epoch in range(epochs):
            share = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=5)
            share.set_epoch(epoch)
            expected += [(epoch, i) for i in list(share)[:3 * batch]]
        sampler = InfiniteSampler(data, num_replicas=2, rank=rank, seed=5, batch_size=batch)
        assert sampler.batches_per_epoch == 3
        assert list(islice(sampler, len(expected))) == expected
        sampler.start_epoch, sampler.start_batch = 1, 2
        tail = expected[(1 * 3 + 2) * batch:]
        assert list(islice(sampler, len(tail))) == tail
    ranks = [list(islice(InfiniteSampler(data, 2, r, 5, batch), 6)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])  # the ranks share no item within an epoch


def test_discriminator_step_trains_d_then_leaves_it_frozen_for_the_generator_side():
    from models.discriminator import DiscriminatorConfig, EditingDualDiscriminator
    from training.losses import d_fake_loss, d_real_loss_r1, discriminator_step, g_adv_loss, generator_step
    from utils.cameras import sample_training_cameras

    torch.manual_seed(0)
    D = EditingDualDiscriminator(DiscriminatorConfig.tiny(16))
    twin = EditingDualDiscriminator(DiscriminatorConfig.tiny(16))
    twin.load_state_dict(D.state_dict())
    real, ref = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    fake = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)  # stands in for the student's image
    cam = sample_training_cameras(2, generator=torch.Generator().manual_seed(0))
    opt, opt_twin = torch.optim.Adam(D.parameters(), lr=1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)

    logs = discriminator_step(D, opt, real, fake, ref, cam, r1_gamma=1.0)
    assert set(logs) == {"D/loss_real", "D/loss_fake", "D/r1", "D/logits_real", "D/logits_fake"}
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())  # read on logging steps only
    assert all(math.isfinite(v) for v in logs.values()) and logs["D/r1"] > 0
    assert not any(p.requires_grad for p in D.parameters())
    # the step is: real loss + R1 backward, fake loss backward, one Adam step
    (d_real_loss_r1(twin, real, ref, cam, 1.0)[0]).backward()
    d_fake_loss(twin, fake, ref, cam)[0].backward()
    opt_twin.step()
    a, b = D.state_dict(), twin.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fake.grad is None  # the D step never reaches the student's image
    d_grads = [p.grad.clone() for p in D.parameters()]
    g_adv_loss(D, fake, ref, cam).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(D.parameters(), d_grads))  # frozen D: nothing added

    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    logs = generator_step((w * w).sum(), torch.optim.SGD([w], lr=1.0), [w], grad_clip=1.0)
    assert set(logs) == {"grad_norm/student"} and float(logs["grad_norm/student"]) == pytest.approx(10.0)  # ‖2w‖
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))
