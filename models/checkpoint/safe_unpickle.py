"""Restricted unpickling of NVIDIA network pickles (EG3D/StyleGAN `.pkl`) and EasyDict `.pth` files.

NVIDIA's `.pkl` snapshots are written by `torch_utils.persistence`: every persistent network is pickled as
`_reconstruct_persistent_obj(meta)` where `meta` carries the source code of the defining module, the class
name and the object's `__dict__`. The official loader *executes* that source. We never do: this module
resolves an exact allow-list of (module, name) globals to inert stand-ins, keeps every network as data
(a `PersistentRecord` / `PickledModuleStub`), and flattens its `_parameters` / `_buffers` / `_modules` into
a state dict. Any other global raises `UnsafePickleError` before it can be called.

Tensor storages inside such pickles are `torch.storage._load_from_bytes(bytes)` where the bytes are a
legacy-format `torch.save`; they are decoded with `torch.load(..., weights_only=True)`, so a payload hidden
in them is refused by torch's own restricted unpickler (re-raised here as `UnsafePickleError`).

    snap = load_pickle("ffhqrebalanced512-128.pkl")          # dict: 'G_ema', 'D', ...
    sd = flatten_persistent_state(snap["G_ema"])             # OrderedDict[str, Tensor], 177 keys
    kwargs = read_init_kwargs(snap["G_ema"])                 # plain dicts
    obj = safe_torch_load("ffhqrebalanced512-128.pth")       # zip torch.save holding EasyDicts
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import types
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from utils.errors import UnknownCheckpointFormatError, UnsafePickleError

PERSISTENCE_VERSION = 6


# --------------------------------------------------------------------------------------------------------
# Inert stand-ins for the NVIDIA globals
# --------------------------------------------------------------------------------------------------------
class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a dict whose items are also attributes. Holds data only."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class PersistentRecord(dict):
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` becomes: data, never code.

    Keys: `class_name` (str), `module_src` (the pickled module source text, never executed), `state`
    (the object's `__dict__`: `_parameters`, `_buffers`, `_modules`, `_init_args`, `_init_kwargs`, ...).
    """

    @property
    def class_name(self) -> str:
        return self["class_name"]

    @property
    def module_src(self) -> str:
        return self["module_src"]

    @property
    def state(self) -> dict:
        return self["state"]

    def __repr__(self) -> str:
        return f"PersistentRecord(class_name={self.get('class_name')!r})"


class PickledModuleStub:
    """Stand-in for a non-persistent class (e.g. `training.triplane.OSGDecoder`, `torch.nn...Softplus`).

    Pickle creates it with `cls.__new__` and hands the object's `__dict__` to `__setstate__`; we keep that
    dict in `.state`. Subclasses made by `_stub_class` carry the original `module_name` / `class_name`.
    """

    module_name = "?"
    class_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never runs original code
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledModuleStub({self.module_name}.{self.class_name})"


def _stub_class(module: str, name: str) -> type:
    return type(name, (PickledModuleStub,), {"module_name": module, "class_name": name, "__module__": __name__})


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    """Replacement for `torch_utils.persistence._reconstruct_persistent_obj`: returns the meta as data."""
    if not isinstance(meta, dict):
        raise UnknownCheckpointFormatError(f"persistent object metadata is a {type(meta).__name__}, expected a dict")
    if meta.get("type") != "class" or meta.get("version") != PERSISTENCE_VERSION:
        raise UnknownCheckpointFormatError(
            f"unsupported NVIDIA persistence record (type={meta.get('type')!r}, version={meta.get('version')!r}); "
            f"only type 'class', version {PERSISTENCE_VERSION} (StyleGAN2-ADA / StyleGAN3 / EG3D) is supported"
        )
    return PersistentRecord(
        class_name=meta.get("class_name"), module_src=meta.get("module_src"), state=meta.get("state")
    )


_NESTED_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def _load_storage_from_bytes(b: Any) -> Any:
    """Replacement for `torch.storage._load_from_bytes`: decode a legacy `torch.save` of one storage.

    The nested pickle goes through torch's `weights_only=True` unpickler, so it cannot run code either.
    Returns a `torch.TypedStorage` / `UntypedStorage` on the CPU.
    """
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafePickleError(f"_load_from_bytes got a {type(b).__name__} instead of bytes; refusing the file")
    try:
        obj = torch.load(io.BytesIO(bytes(b)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = _NESTED_GLOBAL_RE.search(str(e))
        what = f"the global '{m.group(1)}'" if m else "a global outside torch's weights-only allow-list"
        err = UnsafePickleError(
            f"a tensor storage inside the pickle hides a nested pickle that asks for {what}; "
            "it was refused and nothing from the file was executed. Do not use this file."
        )
        err.global_name = m.group(1) if m else None  # type: ignore[attr-defined]
        raise err from None
    if not isinstance(obj, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(
            f"a tensor storage blob inside the pickle decoded to a {type(obj).__name__}, not a storage; refusing the file"
        )
    return obj


def _numpy_scalar() -> Callable:
    core = getattr(np, "_core", None)
    mod = getattr(core, "multiarray", None) if core is not None else None
    if mod is None:  # numpy 1
        mod = np.core.multiarray  # type: ignore[attr-defined]
    return mod.scalar


# Non-persistent classes referenced by EG3D G / D pickles (and a few torch containers/activations that
# StyleGAN-family variants use); all become inert stubs.
STUB_CLASSES: tuple[tuple[str, str], ...] = (
    ("training.triplane", "OSGDecoder"),
    ("training.volumetric_rendering.renderer", "ImportanceRenderer"),
    ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2"),
    ("training.volumetric_rendering.ray_sampler", "RaySampler"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "ModuleDict"),
    ("torch.nn.modules.activation", "Softplus"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.activation", "LeakyReLU"),
    ("torch.nn.modules.activation", "Sigmoid"),
    ("torch.nn.modules.activation", "Tanh"),
    ("torch.nn.modules.linear", "Identity"),
)


def _build_allow_list() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        # tensor reconstruction (pure functions of data already in the pickle)
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # numpy scalars (e.g. weight_gain = np.float64): dtype + raw bytes, never an object array
        ("numpy", "dtype"): np.dtype,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
        ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
        # protocol-2 pickles (torch.save's default) spell `bytes` as _codecs.encode(str, 'latin1')
        ("_codecs", "encode"): _codecs_encode,
        # NVIDIA persistence and dnnlib
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
    }
    if hasattr(torch._utils, "_rebuild_parameter_with_state"):
        allowed[("torch._utils", "_rebuild_parameter_with_state")] = torch._utils._rebuild_parameter_with_state
    for module, name in STUB_CLASSES:
        allowed[(module, name)] = _stub_class(module, name)
    return allowed


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` restricted to str → bytes (all a protocol-2 pickle needs it for)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode called with {type(obj).__name__}/{encoding!r}; refusing the file")
    return obj.encode(encoding, errors)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _build_allow_list()


def _refusal(module: str, name: str) -> UnsafePickleError:
    err = UnsafePickleError(
        f"refused to unpickle the global '{module}.{name}': it is not on the allow-list "
        "(tensor rebuild functions, numpy scalars, OrderedDict, dnnlib EasyDict, NVIDIA persistence records and "
        "the EG3D module classes, all kept as data). Nothing from the file was executed. "
        "Only load network pickles/checkpoints from sources you trust; "
        "supported formats are listed in docs/checkpoints.md."
    )
    err.global_name = f"{module}.{name}"  # type: ignore[attr-defined]
    return err


# --------------------------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------------------------
class _SkippedTensor:
    """Placeholder used when peeking at a pickle's structure without decoding tensor data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        size = args[2] if len(args) > 2 else None
        self.shape = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else None

    def __repr__(self) -> str:
        return f"_SkippedTensor(shape={self.shape})"


def _skip_storage(b: Any) -> None:
    return None


def _skip_parameter(data: Any, *args: Any, **kwargs: Any) -> Any:
    return data


_PEEK_OVERRIDES: dict[tuple[str, str], Any] = {
    ("torch.storage", "_load_from_bytes"): _skip_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _SkippedTensor,
    ("torch._utils", "_rebuild_parameter"): _skip_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _skip_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` resolves only `ALLOWED_GLOBALS` (exact (module, name) pairs).

    `peek=True` skips decoding tensor data (tensors become placeholders); used for format detection.
    """

    def __init__(self, file: BinaryIO, *, peek: bool = False, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._peek = peek

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if self._peek and key in _PEEK_OVERRIDES:
            return _PEEK_OVERRIDES[key]
        try:
            return ALLOWED_GLOBALS[key]
        except (KeyError, TypeError):
            raise _refusal(str(module), str(name)) from None


def restricted_load(file: BinaryIO, **kwargs: Any) -> Any:
    """`pickle.load` with the allow-list."""
    return RestrictedUnpickler(file, **kwargs).load()


def restricted_loads(data: bytes, **kwargs: Any) -> Any:
    """`pickle.loads` with the allow-list."""
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


def _make_pickle_module() -> types.ModuleType:
    """A module object `torch.load(pickle_module=...)` can use: every unpickler torch makes is restricted."""
    mod = types.ModuleType("threedpe_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = restricted_load  # type: ignore[attr-defined]
    mod.loads = restricted_loads  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    mod.Pickler = pickle.Pickler  # type: ignore[attr-defined]  (torch never pickles on load)
    mod.dump = pickle.dump  # type: ignore[attr-defined]
    return mod


RESTRICTED_PICKLE_MODULE = _make_pickle_module()


def load_pickle(path: str | os.PathLike, *, peek: bool = False) -> Any:
    """Load a raw pickle file (NVIDIA `.pkl`) with the allow-list. Tensors come back on the CPU.

    Raises `UnsafePickleError` (naming the global) for anything outside the allow-list, before it runs.
    """
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, peek=peek).load()


def safe_torch_load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` for files that need more than `weights_only=True` (EasyDicts in the converted EG3D `.pth`).

    Both the outer pickle and the nested storage pickles use the allow-list; tensors are mapped to the CPU
    (`map_location='meta'` is accepted for cheap structure peeks).
    """
    if str(map_location) not in ("cpu", "meta"):
        raise ValueError("safe_torch_load maps to 'cpu' (or 'meta' for peeking); move tensors afterwards")
    return torch.load(Path(path), map_location=map_location, weights_only=False, pickle_module=RESTRICTED_PICKLE_MODULE)


class _OriginalNamesPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickler that writes our `EasyDict` as the global `dnnlib.util.EasyDict` (what the original code expects)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is EasyDict:
            if self.proto >= 4:
                self.save("dnnlib.util")
                self.save("EasyDict")
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + b"dnnlib.util\nEasyDict\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[type] = save_global


def _make_writing_module() -> types.ModuleType:
    mod = types.ModuleType("threedpe_original_names_pickle")
    mod.Pickler = _OriginalNamesPickler  # type: ignore[attr-defined]
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = restricted_load  # type: ignore[attr-defined]

    def dump(obj: Any, file: BinaryIO, protocol: int | None = None, **kwargs: Any) -> None:
        _OriginalNamesPickler(file, protocol, **kwargs).dump(obj)

    mod.dump = dump  # type: ignore[attr-defined]
    return mod


#: `torch.save(obj, path, pickle_module=ORIGINAL_NAMES_PICKLE_MODULE)` writes `EasyDict` as `dnnlib.util.EasyDict`.
ORIGINAL_NAMES_PICKLE_MODULE = _make_writing_module()


# --------------------------------------------------------------------------------------------------------
# Reading the records
# --------------------------------------------------------------------------------------------------------
def _module_state(obj: Any) -> dict | None:
    if isinstance(obj, PersistentRecord):
        return obj.state
    if isinstance(obj, PickledModuleStub):
        return obj.state
    return None


def flatten_persistent_state(record: Any, prefix: str = "") -> "collections.OrderedDict[str, torch.Tensor]":
    """State dict of a pickled network, in `nn.Module.state_dict()` order.

    Recursively: `_parameters` (skipping None), `_buffers` (skipping None and names in
    `_non_persistent_buffers_set`), then `_modules`; names joined by '.'. Tensors are detached CPU tensors.
    """
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    _flatten_into(record, prefix, out)
    return out


def _flatten_into(obj: Any, prefix: str, out: dict) -> None:
    state = _module_state(obj)
    if not isinstance(state, dict):
        raise UnknownCheckpointFormatError(f"'{prefix.rstrip('.') or '<root>'}' is not a pickled module ({obj!r})")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = _as_tensor(t, prefix + name)
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in non_persistent:
            out[prefix + name] = _as_tensor(t, prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _flatten_into(child, f"{prefix}{name}.", out)


def _as_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UnknownCheckpointFormatError(f"'{name}' holds a {type(t).__name__}, expected a tensor")
    return t.detach()


def to_plain(obj: Any) -> Any:
    """EasyDicts → dicts, numpy scalars → Python numbers, recursively (tuples stay tuples)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _record_state(record: Any) -> dict:
    state = _module_state(record)
    if not isinstance(state, dict):
        raise UnknownCheckpointFormatError(f"expected a pickled NVIDIA network, got {type(record).__name__}")
    return state


def read_init_args(record: Any) -> tuple:
    """The network's constructor positional args (`_init_args`), as plain Python values."""
    return tuple(to_plain(_record_state(record).get("_init_args") or ()))


def read_init_kwargs(record: Any) -> dict:
    """The network's constructor kwargs (`_init_kwargs`; nested EasyDicts become dicts)."""
    return to_plain(dict(_record_state(record).get("_init_kwargs") or {}))


def read_rendering_kwargs(record: Any) -> dict:
    """`rendering_kwargs` as stored on the pickled generator (falls back to the init kwargs)."""
    state = _record_state(record)
    rk = state.get("rendering_kwargs")
    if rk is None:
        rk = (state.get("_init_kwargs") or {}).get("rendering_kwargs") or {}
    return to_plain(dict(rk))


def read_neural_rendering_resolution(record: Any) -> int | None:
    """`neural_rendering_resolution` as pickled (64 or 128 for the FFHQ-512 models), or None if absent."""
    v = _record_state(record).get("neural_rendering_resolution")
    return None if v is None else int(to_plain(v))
