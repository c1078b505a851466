"""No device→host reads in the hot paths (issue #24): the inference call (prompt + edit + render of N views) and
a training step (teacher, student, losses, D and G updates), whose scalars are read on logging steps only.

Every op that must copy a value to the host before it can return (`.item()`, `bool(t)`, `torch.equal`,
boolean-mask indexing, `nonzero`, ...) drains a GPU's queue; the editor's inference call makes none. Counted on
CPU under a `TorchDispatchMode`, which sees the same aten ops a GPU run dispatches.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.eg3d.stylegan2 import clear_fold_caches
from pipelines.editor import PortraitEditor
from utils.cameras import original_test_cameras

#: aten ops whose result needs the tensor's values on the host (a scalar, a bool, or a data-dependent shape).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "equal", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "unique",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc",
})


#: Indexing ops whose output shape depends on the values when an index is a boolean mask (`x[mask]`).
MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Records the name of every dispatched aten op in `SYNC_OPS`, and boolean-mask indexing as
    'index(mask)' (in `self.ops`, in call order). `host_tensors`: tensors that live on the host whatever the
    device (reading them reads host memory), e.g. the optimisers' step counters."""

    def __init__(self, host_tensors: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.ops: list[str] = []
        self.host = {id(t) for t in host_tensors}
        self.host_reads = 0  # reads of `host_tensors` (not in `ops`)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS and args and id(args[0]) in self.host:
            self.host_reads += 1
        elif name in SYNC_OPS:
            self.ops.append(name)
        elif name in MASK_INDEX_OPS and len(args) > 1 and _has_mask(args[1]):
            self.ops.append(name + "(mask)")
        return func(*args, **(kwargs or {}))


def _inputs(editor: PortraitEditor, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = editor.input_resolution
    return torch.rand(n, 3, r, r, generator=g) * 2 - 1, torch.rand(1, 3, r, r, generator=g) * 2 - 1


def _infer(editor: PortraitEditor, images: torch.Tensor, ref: torch.Tensor, views: int = 3) -> dict[str, torch.Tensor]:
    """The inference call: encode the prompt, edit (or reconstruct), render `views` views of the first input."""
    planes = editor.edit(images, editor.prompt(reference=ref)) if editor.is_editing else editor.reconstruct(images)
    out = editor.render(planes[:1], original_test_cameras(tuple(range(-30, -30 + 20 * views, 20))))
    return {"planes": planes, **out}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_counter_sees_host_reads():
    """Negative control: each kind of host read is counted, plain device maths is not."""
    x = torch.randn(8)
    with SyncCounter() as c:
        y = (x * 2).exp()
    assert c.ops == []
    with SyncCounter() as c:
        x.sum().item()
    assert c.ops == ["_local_scalar_dense"]
    with SyncCounter() as c:
        bool(x.max() > 0)
        torch.equal(x, y)
        x[x > 0]
        float(x[0])
        x[x < 0] = 0
    assert c.ops == ["_local_scalar_dense", "equal", "index(mask)", "_local_scalar_dense", "index_put_(mask)"], c.ops


@pytest.mark.parametrize("kind, precision", [("edit", "fp32"), ("edit", "bf16"), ("reconstruct", "fp32")])
def test_inference_call_makes_no_host_reads_and_keeps_its_outputs(kind, precision):
    editor = PortraitEditor.random_init(kind=kind, tiny=True, seed=0, device="cpu", precision=precision)
    images, ref = _inputs(editor)
    with SyncCounter() as cold:
        first = _infer(editor, images, ref)
    caches = {name: m._cache for name, m in editor.renderer.named_modules() if hasattr(m, "_cache")}
    assert caches and all(c is not None for c in caches.values()), caches  # the super-resolution folded and cached
    with SyncCounter() as warm:  # the folded super-resolution weights come from the cache now
        second = _infer(editor, images, ref)
    assert cold.ops == [] and warm.ops == [], (cold.ops, warm.ops)
    assert all(m._cache is caches[name] for name, m in editor.renderer.named_modules() if name in caches), \
        "the second call folded again instead of reusing the cache"
    fresh = PortraitEditor.random_init(kind=kind, tiny=True, seed=0, device="cpu", precision=precision)
    assert _same(first, second) and _same(second, _infer(fresh, images, ref))


def test_folded_weights_follow_in_place_parameter_changes():
    """The cache is keyed on memory + version counter: an in-place write (optimizer, load_state_dict, copy_)
    is seen; a write through `.data` is not, and `clear_fold_caches` is the documented way out."""
    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    images, ref = _inputs(editor)
    planes, camera = editor.edit(images, editor.prompt(reference=ref)), original_test_cameras((0.0,))

    def render(clear: bool = False) -> torch.Tensor:
        if clear:
            clear_fold_caches(editor.renderer)
        return editor.render(planes, camera)["image"]

    before = render()
    with torch.no_grad():
        editor.renderer.const.mul_(-1)  # the style driving every folded layer
    changed = render()
    assert not torch.equal(changed, before) and torch.equal(changed, render(clear=True))

    state = {k: v.clone() for k, v in editor.renderer.state_dict().items()}
    state["superresolution.block1.torgb.weight"].mul_(2)  # (a conv weight's scale is demodulated away)
    editor.renderer.load_state_dict(state)
    reloaded = render()
    assert not torch.equal(reloaded, changed) and torch.equal(reloaded, render(clear=True))

    editor.renderer.const.data.mul_(-1)  # not seen by the version counter ...
    assert torch.equal(render(), reloaded)
    assert not torch.equal(render(clear=True), reloaded)  # ... until the caches are dropped


def test_an_inference_tensor_style_is_not_cached():
    """A style made under inference_mode has no version counter: it is folded every call, never cached."""
    editor = PortraitEditor.random_init(tiny=True, seed=0, device="cpu")
    sr = editor.renderer.superresolution
    feats = torch.randn(1, sr.block0.in_channels, 8, 8)
    with torch.inference_mode():
        ws = torch.randn(1, 3, editor.renderer.config.w_dim)
        a = sr(feats[:, :3], feats, ws, noise_mode="none")
        assert sr.block0.conv1._cache is None and sr.block1.torgb._cache is None
        ws.mul_(2)
        b = sr(feats[:, :3], feats, ws, noise_mode="none")
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------- training
def _step_counters(*optimizers: torch.optim.Optimizer) -> tuple[torch.Tensor, ...]:
    """Adam's `state['step']` tensors: torch keeps them on the host unless `capturable=True`, so the `.item()`
    the optimiser makes on each is a host read, not a wait for the device."""
    return tuple(st["step"] for opt in optimizers for st in opt.state.values() if "step" in st)


@pytest.mark.parametrize("overrides", [
    ("loss.feature=0.3", "loss.id=0.1", "model.render_chunk=0", "optim.grad_clip=1.0"),  # every term, clipping
    ("model.prompt_encoder=clip", "bf16=true"),                                          # CLIP prompts, autocast
], ids=["mae-all-terms", "clip-bf16"])
def test_training_step_makes_no_host_reads(tmp_path, overrides):
    import contextlib

    from tests.training.test_training import make_tiny_dataset, tiny_config
    from training.setup import build_training
    from training.train import cameras_for, to_device, train_step

    data = make_tiny_dataset(tmp_path / "data", n_portraits=4)
    cfg = tiny_config(data, tmp_path / "exps", "syncs", "gan.start_step=0", *overrides)
    s = build_training(cfg)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext
    batches = iter(s.loader)
    for step in range(2):  # the optimisers make their state (and its step counters) in the first step
        batch = to_device(next(batches), s.device)
        cams = cameras_for(batch, 2, s.cam_gen, s.device)
        with SyncCounter(_step_counters(s.opt_g, s.opt_d)) as c:
            out = train_step(s, cfg, batch, cams, step, autocast)
    assert c.ops == [], c.ops
    assert c.host_reads == len(s.opt_g.state) + len(s.opt_d.state)  # the counter sees reads: one per parameter
    assert {"D/r1", "D/loss_fake"} <= set(out.logs) and all(v.dim() == 0 for v in out.logs.values())


def test_logging_reads_every_scalar_in_one_transfer():
    from utils.distributed import all_reduce_mean

    scalars = {f"loss/{i}": torch.tensor(float(i)) for i in range(20)} | {"lr": 0.5}
    with SyncCounter() as c:
        means = all_reduce_mean(scalars, torch.device("cpu"))
    assert c.ops == [] and means == {**{f"loss/{i}": float(i) for i in range(20)}, "lr": 0.5}
    with SyncCounter() as per_item:  # what reading them one by one costs
        [v.item() for v in scalars.values() if torch.is_tensor(v)]
    assert per_item.ops == ["_local_scalar_dense"] * 20


# ------------------------------------------------------------------------------------------- placement
class HostTensorsMade(TorchDispatchMode):
    """Records every op that returns a CPU tensor with elements (a 0-dim CPU scalar is a kernel argument, not a
    copy), with the project frame that made it."""

    def __init__(self):
        super().__init__()
        self.made: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and o.dim() > 0:
                import traceback

                where = [f for f in traceback.extract_stack() if "/tests/" not in f.filename and "torch" not in f.filename]
                self.made.append(f"{func._schema.name} at {where[-1].filename}:{where[-1].lineno}" if where else func._schema.name)
        return out


@pytest.mark.parametrize("kind", ["edit", "reconstruct"])
def test_inference_creates_no_host_tensor_when_the_device_is_cuda(kind):
    """Modules and inputs on "cuda" as fake tensors (no GPU needed): the prompt, edit and render make every
    tensor on the device; a tensor made on the host would be copied over (a pageable host→device copy waits for
    the device) or fail with a device mismatch."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    editor = PortraitEditor.random_init(kind=kind, tiny=True, seed=0, device="cpu")
    cams = original_test_cameras()
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fold cache reads a fake tensor's (meaningless) address
        encoder, renderer = editor.encoder.to("cuda"), editor.renderer.to("cuda")
        r = editor.input_resolution
        image, ref, cams = torch.rand(1, 3, r, r, device="cuda"), torch.rand(1, 3, r, r, device="cuda"), cams.to("cuda")
        with torch.inference_mode(), HostTensorsMade() as made:
            planes = encoder(image, *encoder.encode_prompt(reference=ref)) if kind == "edit" else encoder(image)
            views = renderer(planes, cams, deterministic=True)
    assert planes.device.type == "cuda" and views["image"].device.type == "cuda"
    assert made.made == [], made.made


def test_the_placement_check_sees_a_host_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.rand(4, 3, device="cuda")
        with HostTensorsMade() as made:
            x[:, [0, 2, 1]]  # an index list becomes a host tensor first
    assert made.made


def test_training_step_creates_no_host_tensor_on_another_device(tmp_path):
    """The whole step (teacher, student, every loss term, D with R1, both updates, clipping) with the networks,
    the loss nets and the batch on the "meta" device (shapes only, any device's stand-in): every tensor it makes is
    made there. The optimisers' step counters are 0-dim host scalars by torch's design (not counted)."""
    import contextlib

    from tests.training.test_training import make_tiny_dataset, tiny_config
    from training.setup import build_training, set_modes
    from training.train import cameras_for, to_device, train_step

    data = make_tiny_dataset(tmp_path / "data", n_portraits=4)
    # (MAE prompts: with CLIP the text token ids and each sample's text-or-image draw are made on the host, as
    # inputs are, and copied over once per step)
    cfg = tiny_config(data, tmp_path / "exps", "placement", "gan.start_step=0", "loss.feature=0.3", "loss.id=0.1",
                      "optim.grad_clip=1.0")
    s = build_training(cfg)
    meta = torch.device("meta")
    for module in (s.teacher, s.student, s.renderer, s.D, s.loss_fn):
        module.to(meta)
    s.device = meta
    batch = next(iter(s.loader))
    cams = cameras_for(batch, 2, s.cam_gen, torch.device("cpu")).to(meta)
    set_modes(s.encoder, list(cfg.model.trainable), cfg.model.frozen_dropout, teacher=s.teacher)
    with HostTensorsMade() as made:
        out = train_step(s, cfg, to_device(batch, meta), cams, 0, contextlib.nullcontext)
    assert out.loss.device == meta and {"D/r1", "grad_norm/student"} <= set(out.logs)
    assert made.made == [], made.made
