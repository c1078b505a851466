"""No device→host reads in the inference hot path (issue #24): prompt + edit + render of N views.

Every op that must copy a value to the host before it can return (`.item()`, `bool(t)`, `torch.equal`,
boolean-mask indexing, `nonzero`, ...) drains a GPU's queue; the editor's inference call makes none. Counted on
CPU under a `TorchDispatchMode`, which sees the same aten ops a GPU run dispatches.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.eg3d.decoder import softplus_no_grad
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
    'index(mask)' (in `self.ops`, in call order)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
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


def test_softplus_without_host_read_matches_both_branches():
    h = torch.cat([torch.linspace(-40, 40, 4001), torch.randn(5000) * 8])
    with SyncCounter() as c:
        got = softplus_no_grad(h.clone())
    assert c.ops == []
    below = h <= 20
    assert torch.equal(got[below], h[below].exp().log1p()) and torch.equal(got[~below], h[~below])
