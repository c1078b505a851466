"""The compiled path (issue #24): `--compile` / `PortraitEditor(compile=True)` and the training config's `compile`.

- every compiled region is one graph (no graph break: `fullgraph=True` would raise, `explain` counts them);
- compiled outputs equal eager ones to fp32 rounding (inference with inductor, the real backend; training with
  `aot_eager`, which runs the same traced and decomposed graphs without the minutes inductor needs to generate
  code for a backward on 2 cores);
- inputs of one size never recompile: the graph count stays put after the first call.
"""
from __future__ import annotations

import argparse
import contextlib

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from pipelines.editor import PortraitEditor
from rounding import forward_rel
from tests.training.test_training import make_tiny_dataset, tiny_config
from utils.cameras import original_test_cameras

# A compiled graph computes the same sums in another order (fused kernels, other reductions): per output, the
# forward rounding bound of the tiny networks' longest chain (as tests/training/test_training.py's TINY_EDIT_FP32_REL).
COMPILED_REL = forward_rel(50, 864)  # 1.8e-4


def _inputs(editor: PortraitEditor, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = editor.input_resolution
    return [torch.rand(1, 3, r, r, generator=g) * 2 - 1 for _ in range(n)]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _one_graph(fn, *args, **kwargs) -> None:
    ex = dynamo.explain(fn)(*args, **kwargs)
    reasons = [f"{b.reason.splitlines()[0]} at {b.user_stack[-1] if b.user_stack else '?'}" for b in ex.break_reasons]
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), reasons[:5]


@pytest.mark.parametrize("kind", ["edit", "reconstruct"])
def test_inference_regions_are_one_graph_each(kind, fresh_dynamo):
    editor = PortraitEditor.random_init(kind=kind, tiny=True, seed=0, device="cpu")
    image, ref = _inputs(editor, 2)
    with torch.inference_mode():
        args = (image,) if kind == "reconstruct" else (image, *editor.encoder.encode_prompt(reference=ref))
        _one_graph(editor.encoder, *args)
        planes = editor.encoder(*args)
        _one_graph(editor.renderer, planes, original_test_cameras(), deterministic=True)


def test_compiled_editor_equals_eager_and_compiles_once_per_input_size(fresh_dynamo):
    eager = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    compiled = PortraitEditor.random_init(tiny=True, seed=0, device="cpu", compile=True)
    assert compiled.compiled and not eager.compiled
    ref, *images = _inputs(eager, 4)
    prompt, cams = eager.prompt(reference=ref), original_test_cameras()
    graphs = []
    for image in images:  # three portraits of one size: the first call compiles, the others reuse its graphs
        want = {"planes": eager.edit(image, prompt)}
        want.update(eager.render(want["planes"], cams))
        got = {"planes": compiled.edit(image, prompt)}
        got.update(compiled.render(got["planes"], cams))
        graphs.append(_graphs())
        for k, w in want.items():  # measured: 2.4e-6 of max|x| (views), against 1.8e-4
            assert (got[k] - w).abs().max() <= COMPILED_REL * w.abs().max(), k
    assert graphs == [2, 2, 2]  # the encoder's graph and the renderer's, compiled once


def test_training_regions_are_one_graph_each(tmp_path, fresh_dynamo):
    from training.setup import build_training, set_modes
    from training.train import cameras_for, d_sized, to_device

    data = make_tiny_dataset(tmp_path / "data", n_portraits=4)
    cfg = tiny_config(data, tmp_path / "exps", "graphs", "model.render_chunk=2")
    s = build_training(cfg)
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    batch = to_device(next(iter(s.loader)), s.device)
    cams = cameras_for(batch, 2, s.cam_gen, s.device)
    _one_graph(s.student, batch["input"], batch["reference"], cams)  # with gradients: checkpointed render chunks
    with torch.no_grad():
        _one_graph(s.teacher, batch["target"])
    r = s.D.config.img_resolution
    _one_graph(s.D, d_sized(batch["target"], r), d_sized(batch["reference"], r), batch["camera"])


def test_compiled_training_steps_equal_eager_ones_without_recompiling(tmp_path, fresh_dynamo):
    from training.setup import build_training, compile_networks, set_modes
    from training.train import cameras_for, to_device, train_step

    data = make_tiny_dataset(tmp_path / "data", n_portraits=4)
    runs = {}
    for compiled in (False, True):
        cfg = tiny_config(data, tmp_path / "exps", f"compiled{compiled}", "gan.start_step=0", "data.val_fraction=0.0",
                          "optim.grad_clip=1.0")
        s = build_training(cfg)
        if compiled:
            compile_networks(s.teacher, s.student, s.renderer, s.D, backend="aot_eager")
        set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
        s.D.train()
        batches, losses, graphs = iter(s.loader), [], []
        for step in range(3):
            batch = to_device(next(batches), s.device)
            out = train_step(s, cfg, batch, cameras_for(batch, 2, s.cam_gen, s.device), step, contextlib.nullcontext,
                             deterministic=True)
            losses.append({k: float(v.detach()) for k, v in {"total": out.loss, **out.terms, **out.logs}.items()})
            graphs.append(_graphs())
        runs[compiled] = losses, graphs
    (want, _), (got, graphs) = runs[False], runs[True]
    # teacher, student, renderer (the teacher's render), D with gradients for its weights (fake pass) and D
    # frozen (the student's adversarial pass): five graphs in the first step, none added later. R1 ran eager.
    assert graphs == [5, 5, 5]
    for w, g in zip(want, got):  # steps 2 and 3 start from the updated weights; measured: 1.5e-5 relative at most
        assert w.keys() == g.keys()
        for k in w:
            assert abs(g[k] - w[k]) <= COMPILED_REL * max(abs(w[k]), 1e-3), (k, g[k], w[k])


def test_compile_flag_reaches_the_editor(monkeypatch):
    from tools.editor_options import EditorOptions, add_editor_arguments

    calls = []
    monkeypatch.setattr(PortraitEditor, "compile", lambda self, mode=None, backend="inductor": calls.append(mode))
    p = argparse.ArgumentParser()
    add_editor_arguments(p)
    for argv in (["--compile"], []):
        args = p.parse_args(["--random-init", "--tiny", "--device", "cpu", *argv])
        EditorOptions.from_args(args).build(needs_text=False, warn_random_init=False)
    assert calls == [None]
