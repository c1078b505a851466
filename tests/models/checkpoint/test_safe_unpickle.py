"""The restricted unpickler: NVIDIA persistence layouts load as data; anything else is refused and never runs.

The pickles are built here with fake `torch_utils` / `dnnlib` / `training` modules that exist in
`sys.modules` only while dumping, so the loader sees exactly what NVIDIA's code writes (globals, numpy
scalars, `_load_from_bytes` legacy storage blobs) without that code being importable.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from models.checkpoint.safe_unpickle import (
    ALLOWED_GLOBALS,
    ORIGINAL_NAMES_PICKLE_MODULE,
    EasyDict,
    PersistentRecord,
    flatten_persistent_state,
    load_pickle,
    read_init_args,
    read_init_kwargs,
    read_neural_rendering_resolution,
    read_rendering_kwargs,
    restricted_loads,
    safe_torch_load,
)
from fake_modules import fake_modules
from utils.errors import UnsafePickleError

FAKE_MODULES = (
    "torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training.triplane",
    "training.volumetric_rendering", "training.volumetric_rendering.renderer",
)


def _reduce_persistent(self: nn.Module):
    state = dict(self.__dict__)
    meta = dict(type="class", version=6, module_src=f"# source of {type(self).__name__}\nimport os\n",
                class_name=type(self).__name__, state=state)
    return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


@contextlib.contextmanager
def nvidia_modules():
    """Fake NVIDIA modules in sys.modules (only while dumping); yields a namespace of their classes."""
    with fake_modules(FAKE_MODULES) as mods:

        class NvEasyDict(dict):
            def __getattr__(self, k):
                try:
                    return self[k]
                except KeyError:
                    raise AttributeError(k) from None

            def __setattr__(self, k, v):
                self[k] = v

        NvEasyDict.__module__, NvEasyDict.__qualname__, NvEasyDict.__name__ = "dnnlib.util", "EasyDict", "EasyDict"
        mods["dnnlib.util"].EasyDict = NvEasyDict
        mods["dnnlib"].EasyDict = NvEasyDict

        def persistent(name: str, base: type = nn.Module) -> type:
            return type(name, (base,), {"__reduce__": _reduce_persistent, "__module__": "training.networks_stylegan2"})

        class OSGDecoder(nn.Module):
            pass

        class ImportanceRenderer(nn.Module):
            pass

        for cls, mod in ((OSGDecoder, "training.triplane"),
                         (ImportanceRenderer, "training.volumetric_rendering.renderer")):
            cls.__module__, cls.__qualname__ = mod, cls.__name__
            setattr(mods[mod], cls.__name__, cls)
        yield types.SimpleNamespace(EasyDict=NvEasyDict, persistent=persistent, OSGDecoder=OSGDecoder,
                                    ImportanceRenderer=ImportanceRenderer)


def _make_fake_generator(ns) -> nn.Module:
    """A small module tree shaped like EG3D's G_ema (persistent records, stubs, EasyDicts, numpy scalars)."""
    torch.manual_seed(0)
    FC = ns.persistent("FullyConnectedLayer")
    Mapping = ns.persistent("MappingNetwork")
    Gen = ns.persistent("TriPlaneGenerator")

    def fc(i, o):
        m = FC()
        m.weight = nn.Parameter(torch.randn(o, i))
        m.bias = nn.Parameter(torch.randn(o))
        m.weight_gain = np.float64(1 / np.sqrt(i))  # numpy scalar, as in NVIDIA's layers
        m.activation = "linear"
        m._init_args, m._init_kwargs = (i, o), ns.EasyDict(lr_multiplier=1)
        return m

    g = Gen()
    g.register_buffer("dataset_label_std", torch.rand(25))
    g.register_buffer("scratch", torch.zeros(3), persistent=False)
    g.register_parameter("unused", None)
    mapping = Mapping()
    mapping.fc0, mapping.fc1 = fc(8, 6), fc(6, 6)
    mapping.register_buffer("w_avg", torch.randn(6))
    mapping.register_buffer("absent", None)
    mapping._init_args, mapping._init_kwargs = (), ns.EasyDict(z_dim=8, w_dim=6, num_layers=2)
    g.mapping = mapping
    dec = ns.OSGDecoder()
    dec.net = nn.Sequential(fc(4, 5), nn.Softplus(), fc(5, 3))
    g.decoder = dec
    g.renderer = ns.ImportanceRenderer()
    g.renderer.plane_axes = torch.eye(3)  # plain tensor attribute: not in the state dict
    g.rendering_kwargs = ns.EasyDict(depth_resolution=4, ray_start=2.25, avg_camera_pivot=[0, 0, 0.2])
    g.neural_rendering_resolution = 64
    g._last_planes = None
    g.z_dim = 8
    g._init_args = (8, 25, 6)
    g._init_kwargs = dict(img_resolution=32, mapping_kwargs=ns.EasyDict(num_layers=2),
                          rendering_kwargs=ns.EasyDict(g.rendering_kwargs), sr_num_fp16_res=np.int64(4))
    return g


def _dump(obj, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


@pytest.fixture(scope="module")
def snapshot_bytes():
    with nvidia_modules() as ns:
        g = _make_fake_generator(ns)
        expected = g.state_dict()
        data = {"training_set_kwargs": ns.EasyDict(resolution=32), "G": g, "D": None, "G_ema": g, "augment_pipe": None}
        blob = _dump(data)
    return blob, expected


def test_nvidia_modules_are_not_importable_when_loading(snapshot_bytes):
    blob, _ = snapshot_bytes
    for name in ("torch_utils", "dnnlib", "training.triplane"):
        assert name not in sys.modules
    assert importlib.util.find_spec("torch_utils") is None
    assert importlib.util.find_spec("dnnlib") is None
    for needle in (b"torch_utils.persistence", b"_reconstruct_persistent_obj", b"dnnlib.util", b"_load_from_bytes",
                   b"training.triplane", b"numpy._core.multiarray", b"torch.nn.modules.container"):
        assert needle in blob
    restricted_loads(blob)
    assert not any(n in sys.modules for n in ("torch_utils", "dnnlib", "training.triplane"))


def test_snapshot_flattens_to_the_state_dict(snapshot_bytes):
    blob, expected = snapshot_bytes
    snap = restricted_loads(blob)
    assert list(snap) == ["training_set_kwargs", "G", "D", "G_ema", "augment_pipe"]
    assert isinstance(snap["training_set_kwargs"], EasyDict) and snap["training_set_kwargs"].resolution == 32
    rec = snap["G_ema"]
    assert isinstance(rec, PersistentRecord) and rec.class_name == "TriPlaneGenerator"
    assert "import os" in rec.module_src  # kept as text, never executed
    sd = flatten_persistent_state(rec)
    assert list(sd) == list(expected)  # same names, same order (dataset_label_std first, no scratch/None)
    assert "scratch" not in sd and "unused" not in sd and "mapping.absent" not in sd
    assert "renderer.plane_axes" not in sd
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k  # unpickling only moves stored tensors: bit-exact (measured 0)
        assert not sd[k].requires_grad
    assert sd["decoder.net.0.weight"].shape == (5, 4)
    assert isinstance(rec.state["_modules"]["mapping"].state["_modules"]["fc0"].state["weight_gain"], np.float64)


def test_readers(snapshot_bytes):
    rec = restricted_loads(snapshot_bytes[0])["G_ema"]
    assert read_init_args(rec) == (8, 25, 6)
    kw = read_init_kwargs(rec)
    assert kw["mapping_kwargs"] == {"num_layers": 2} and type(kw["mapping_kwargs"]) is dict
    assert kw["sr_num_fp16_res"] == 4 and type(kw["sr_num_fp16_res"]) is int
    assert read_rendering_kwargs(rec) == {"depth_resolution": 4, "ray_start": 2.25, "avg_camera_pivot": [0, 0, 0.2]}
    assert read_neural_rendering_resolution(rec) == 64


def test_load_pickle_from_file_and_peek(tmp_path, snapshot_bytes):
    p = tmp_path / "net.pkl"
    p.write_bytes(snapshot_bytes[0])
    sd = flatten_persistent_state(load_pickle(p)["G_ema"])
    assert torch.equal(sd["mapping.w_avg"], snapshot_bytes[1]["mapping.w_avg"])
    peek = load_pickle(p, peek=True)
    assert set(peek) == {"training_set_kwargs", "G", "D", "G_ema", "augment_pipe"}


def test_protocol2_numpy_scalars_and_bytes():
    # protocol 2 spells bytes as _codecs.encode(..., 'latin1'): numpy scalars need it
    blob = _dump({"g": np.float64(0.125), "b": b"\x00\xff"}, protocol=2)
    out = restricted_loads(blob)
    assert out["g"] == 0.125 and out["b"] == b"\x00\xff"


def test_safe_torch_load_easydict_pth(tmp_path):
    with nvidia_modules() as ns:
        obj = {"G_init_args": (), "G_init_kwargs": ns.EasyDict(z_dim=8, mapping_kwargs=ns.EasyDict(num_layers=2)),
               "G": collections.OrderedDict(w=torch.randn(3, 2)), "G_neural_rendering_resolution": 128}
        torch.save(obj, tmp_path / "g.pth")
    out = safe_torch_load(tmp_path / "g.pth")
    assert out["G_init_kwargs"].mapping_kwargs.num_layers == 2
    assert torch.equal(out["G"]["w"], obj["G"]["w"]) and out["G"]["w"].device.type == "cpu"
    # our writer spells EasyDict as dnnlib.util.EasyDict, and it loads back the same way
    torch.save({"k": EasyDict(a=EasyDict(b=1))}, tmp_path / "ours.pth", pickle_module=ORIGINAL_NAMES_PICKLE_MODULE)
    assert safe_torch_load(tmp_path / "ours.pth")["k"].a.b == 1
    import zipfile

    with zipfile.ZipFile(tmp_path / "ours.pth") as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        assert b"dnnlib.util\nEasyDict" in z.read(pkl)


def test_allow_list_is_exact():
    modules = {m for m, _ in ALLOWED_GLOBALS}
    assert not any(m in ("builtins", "__builtin__", "os", "posix", "subprocess", "sys") for m in modules)
    assert not any(m.startswith(("numpy.testing", "torch.hub")) for m in modules)
    assert ("torch", "load") not in ALLOWED_GLOBALS and ("torch.serialization", "load") not in ALLOWED_GLOBALS


# ------------------------------------------------------------------------------------------------------------
# Malicious pickles
# ------------------------------------------------------------------------------------------------------------
class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker: str) -> dict[str, tuple[object, str]]:
    """name → (object whose unpickling would create `marker`, the global it asks for)."""
    code = f"open({marker!r}, 'w').close()"
    return {
        "os.system": (_Reduce(os.system, (f"touch {marker}",)), "system"),
        "builtins.exec": (_Reduce(exec, (code,)), "builtins.exec"),
        "subprocess.Popen": (_Reduce(subprocess.Popen, (["touch", marker],)), "subprocess.Popen"),
        "torch.load": (_Reduce(torch.load, (marker,)), "load"),
        "numpy.testing": (_Reduce(np.testing._private.utils.runstring, (code, {})), "numpy.testing"),
    }


RAW_GLOBALS = [(b"os", b"system"), (b"builtins", b"eval"), (b"torch", b"load"), (b"torch.hub", b"load"),
               (b"subprocess", b"check_call"), (b"builtins", b"getattr")]


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.Popen", "torch.load", "numpy.testing"])
@pytest.mark.parametrize("where", ["top", "init_kwargs", "module_state"])
def test_malicious_payloads_are_refused(tmp_path, kind, where):
    marker = str(tmp_path / "PWNED")
    payload, global_part = _payloads(marker)[kind]
    with nvidia_modules() as ns:
        if where == "top":
            data = payload
        else:
            g = _make_fake_generator(ns)
            if where == "init_kwargs":
                g._init_kwargs["mapping_kwargs"]["evil"] = payload
            else:
                g.mapping.fc1.evil = payload
            data = {"G_ema": g}
        blob = _dump(data)
    with pytest.raises(UnsafePickleError) as ei:
        restricted_loads(blob)
    assert global_part in str(ei.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("module,name", RAW_GLOBALS)
def test_raw_globals_are_refused_by_name(tmp_path, module, name):
    marker = str(tmp_path / "PWNED")
    blob = b"c" + module + b"\n" + name + b"\n(V" + marker.encode() + b"\ntR."
    with pytest.raises(UnsafePickleError, match=f"'{module.decode()}.{name.decode()}'"):
        restricted_loads(blob)
    assert not os.path.exists(marker)


def test_payload_hidden_in_storage_bytes(tmp_path):
    """A legacy storage blob whose nested pickle calls os.system: torch's weights_only refuses it."""
    marker = str(tmp_path / "PWNED")
    buf = io.BytesIO()
    torch.save(_Reduce(os.system, (f"touch {marker}",)), buf, _use_new_zipfile_serialization=False)
    evil_bytes = buf.getvalue()

    class EvilTensor:
        def __reduce__(self):
            storage = _Reduce(torch.storage._load_from_bytes, (evil_bytes,))
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (1,), (1,), False, collections.OrderedDict()))

    with nvidia_modules() as ns:
        g = _make_fake_generator(ns)
        g.mapping.fc0._parameters["weight"] = EvilTensor()  # inside an otherwise valid snapshot
        blob = _dump({"G_ema": g})
    assert b"_load_from_bytes" in blob
    with pytest.raises(UnsafePickleError, match="system"):
        restricted_loads(blob)
    assert not os.path.exists(marker)


def test_malicious_torch_file_is_refused(tmp_path):
    marker = str(tmp_path / "PWNED")
    torch.save({"G": _Reduce(os.system, (f"touch {marker}",))}, tmp_path / "evil.pth")
    with pytest.raises(UnsafePickleError, match="system"):
        safe_torch_load(tmp_path / "evil.pth")
    assert not os.path.exists(marker)


def test_unsupported_persistence_version_is_refused():
    with nvidia_modules():
        class Old:
            def __reduce__(self):
                meta = dict(type="class", version=5, module_src="", class_name="X", state={})
                return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))

        blob = _dump(Old())
    with pytest.raises(Exception, match="version"):
        restricted_loads(blob)
