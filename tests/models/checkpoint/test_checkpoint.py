"""Checkpoint formats: detection from content, loading, the converter CLI, the project format, exports.

Original-layout files are written here: with the full key lists (tensors with tiny storage, expanded to the
listed shapes) for detection/loading, and from tiny models for conversion round trips and strict builds.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, perturbed_tiny_generator, read_key_list
from fake_modules import fake_modules
from models import checkpoint as ck
from models.checkpoint.safe_unpickle import safe_torch_load
from utils.errors import ConfigError, MissingWeightsError, UnknownCheckpointFormatError, UnsafePickleError

CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cheap_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values along the last dim, expanded (stride 0) to `shape`: full shape, tiny storage."""
    if not shape:
        return torch.randn((), generator=gen)
    return torch.randn(shape[-1], generator=gen).expand(*shape)


def sd_from_list(path: Path, seed: int = 0) -> collections.OrderedDict:
    gen = torch.Generator().manual_seed(seed)
    return collections.OrderedDict((k, cheap_tensor(s, gen)) for k, s in read_key_list(path))


def adamw_state(params: list[torch.Tensor], old_torch: bool = False) -> dict:
    """An AdamW state_dict like the original's (torch 2.x group keys, or torch 1.13's fewer keys)."""
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(1).expand(p.shape),
                 "exp_avg_sq": torch.zeros(1).expand(p.shape)} for i, p in enumerate(params)}
    group = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
                 foreach=None, capturable=False, params=list(range(len(params))))
    if not old_torch:
        group.update(differentiable=False, fused=None, decoupled_weight_decay=True)
    return {"state": state, "param_groups": [group]}


def opts_from(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines()[1:]:
        name, typ, value = line.split("\t")
        out[name] = "/abs/path" if value.startswith("<") else eval(value)  # noqa: S307 (test data: literals)
    return out


def write_training_ckpt(path: Path, kind: str, enc, ren, disc, opts, *, step: int, old_torch: bool = False) -> None:
    """The original Coach layout: 7 keys (3dpe) or 8 (Live3D, + render_optimizer)."""
    if kind == "3dpe":
        opt_params = [v for k, v in enc.items() if k.startswith(("Final_encoder.", "Ref_encoder."))]
    else:
        opt_params = list(enc.values())
    obj = {"encoder_state_dict": enc, "renderer_state_dict": ren, "discriminator_state": disc, "opts": opts,
           "best_val_loss": None, "step": step, "encoder_optimizer": adamw_state(opt_params, old_torch)}
    if kind != "3dpe":
        obj["render_optimizer"] = {"state": {}, "param_groups": adamw_state([], old_torch)["param_groups"]}
    torch.save(obj, path)


FULL_CASES = {
    "3dpe": ("3dpe_encoder_state_dict.tsv", "dual_discriminator_editing_state_dict.tsv", "3dpe_opts.tsv", "3dpe"),
    "live3d-lt": ("live3d_LT_encoder_state_dict.tsv", "dual_discriminator_state_dict.tsv", "live3d_opts.tsv", "live3d"),
    "live3d-normal": ("live3d_Normal_encoder_state_dict.tsv", "dual_discriminator_state_dict.tsv", "live3d_opts.tsv",
                      "live3d"),
}


@pytest.mark.parametrize("fmt", list(FULL_CASES))
def test_full_key_list_checkpoints_detect_and_load(tmp_path, keys_dir, fmt):
    enc_list, d_list, opts_list, model_type = FULL_CASES[fmt]
    enc, ren = sd_from_list(keys_dir / enc_list, 1), sd_from_list(keys_dir / "renderer_state_dict.tsv", 2)
    disc, opts = sd_from_list(keys_dir / d_list, 3), opts_from(keys_dir / opts_list)
    path = tmp_path / "ckpt.bin"  # the name says nothing: detection is by content
    write_training_ckpt(path, "3dpe" if fmt == "3dpe" else "live3d", enc, ren, disc, opts, step=90000,
                        old_torch=(fmt == "live3d-lt"))
    assert ck.detect_format(path) == fmt
    c = ck.load_checkpoint(path)
    assert (c.format, c.model_type) == (fmt, model_type)
    for comp, want in (("encoder", enc), ("renderer", ren), ("discriminator", disc)):
        got = c.components[comp]
        assert list(got) == list(want)
        assert all(got[k].shape == want[k].shape and torch.equal(got[k], want[k]) for k in want)
    assert c.meta["step"] == 90000 and c.meta["opts"] == opts and c.meta["source_format"] == fmt
    if fmt.startswith("live3d"):
        assert c.configs["encoder"].mode == ("LT" if fmt == "live3d-lt" else "Normal")
    # the full-size default architectures take these weights strictly (checked on the meta device)
    models = ck.build_models(c, device="meta")
    assert set(models) == {"encoder", "renderer", "discriminator"}


def test_cuda_saved_checkpoint_loads_on_cpu(tmp_path, keys_dir, monkeypatch):
    ren = sd_from_list(keys_dir / "renderer_state_dict.tsv")
    enc = collections.OrderedDict((k, torch.zeros(1)) for k, _ in read_key_list(keys_dir / "live3d_LT_encoder_state_dict.tsv"))
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    write_training_ckpt(tmp_path / "gpu.pt", "live3d", enc, ren, collections.OrderedDict(), {}, step=1)
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "gpu.pt") as z:
        assert b"cuda:0" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    c = ck.load_checkpoint(tmp_path / "gpu.pt")
    assert c.format == "live3d-lt" and c.components["renderer"]["const"].device.type == "cpu"
    assert "discriminator" not in c.components  # empty D state is not a component


def test_unknown_and_missing(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(UnknownCheckpointFormatError, match="junk.pt"):
        ck.detect_format(tmp_path / "junk.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(UnknownCheckpointFormatError, match="'model', 'epoch'"):
        ck.load_checkpoint(tmp_path / "other.pt")
    torch.save({"encoder_state_dict": {"foo.weight": torch.zeros(1)}}, tmp_path / "enc.pt")
    with pytest.raises(UnknownCheckpointFormatError, match="neither 3dpe"):
        ck.detect_format(tmp_path / "enc.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(UnknownCheckpointFormatError, match="config.json"):
        ck.detect_format(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UnknownCheckpointFormatError, match="threedpe"):
        ck.load_checkpoint(tmp_path / "d")


# ------------------------------------------------------------------------------------------------------------
# tiny models: conversion round trips
# ------------------------------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", *map(str, args)], cwd=ROOT, env=CLI_ENV,
                          capture_output=True, text=True, timeout=300)


def run_main(capsys, *args: str) -> tuple[int, str]:
    """The same CLI in-process (cheaper than a subprocess): (exit code, stderr)."""
    from tools.convert_checkpoint import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def arch_json(path: Path, **configs) -> Path:
    """A converter `--config` file: {component: config fields}."""
    from utils.config import to_dict

    path.write_text(json.dumps({comp: to_dict(cfg) for comp, cfg in configs.items()}))
    return path


def assert_same_sd(a, b) -> None:
    """Same keys, order, shapes and bits: conversion only moves stored tensors (bound 0, measured 0)."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def tiny_3dpe_configs() -> dict:
    """The architecture of `tiny_3dpe` (what its 3dpe.pt does not record)."""
    from models.discriminator import DiscriminatorConfig
    from models.editing.editing_encoder import EditingEncoderConfig
    from models.eg3d.config import RendererConfig

    return {"encoder": EditingEncoderConfig.tiny(), "renderer": RendererConfig.tiny(),
            "discriminator": DiscriminatorConfig.tiny()}


@pytest.fixture(scope="module")
def tiny_3dpe():
    from models.discriminator import EditingDualDiscriminator
    from models.editing.editing_encoder import EditingEncoder
    from models.eg3d.triplane_renderer import TriplaneRenderer

    torch.manual_seed(0)
    cfgs = tiny_3dpe_configs()
    enc = EditingEncoder(cfgs["encoder"]).eval()
    ren = TriplaneRenderer(cfgs["renderer"]).eval()
    disc = EditingDualDiscriminator(cfgs["discriminator"]).eval()
    return enc, ren, disc


def test_tiny_3dpe_convert_reload_build_export(tmp_path, tiny_3dpe, keys_dir, capsys):
    enc, ren, disc = tiny_3dpe
    src = tmp_path / "3dpe.pt"
    opts = opts_from(keys_dir / "3dpe_opts.tsv")
    write_training_ckpt(src, "3dpe", enc.state_dict(), ren.state_dict(), disc.state_dict(), opts, step=120000)
    assert ck.detect_format(src) == "3dpe"

    arch = arch_json(tmp_path / "arch.json", **tiny_3dpe_configs())
    r = run_cli(src, tmp_path / "proj", "--config", arch)
    assert r.returncode == 0, r.stderr
    assert "3dpe" in r.stdout
    cfg = json.loads((tmp_path / "proj" / "config.json").read_text())
    assert (cfg["format"], cfg["format_version"], cfg["model_type"]) == ("threedpe", 1, "3dpe")
    assert set(cfg["config"]) == {"encoder", "renderer", "discriminator"}
    assert cfg["source"]["format"] == "3dpe" and cfg["source"]["step"] == 120000 and cfg["source"]["opts"] == opts
    assert ck.detect_format(tmp_path / "proj") == "threedpe"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "proj" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == {f"{c}.{k}" for c, m in (("encoder", enc), ("renderer", ren), ("discriminator", disc))
                     for k in m.state_dict()}

    back = ck.load_checkpoint(tmp_path / "proj")
    assert (back.format, back.model_type) == ("threedpe", "3dpe")
    assert_same_sd(back.components["encoder"], enc.state_dict())
    assert_same_sd(back.components["renderer"], ren.state_dict())
    assert_same_sd(back.components["discriminator"], disc.state_dict())
    models = ck.build_models(back)
    assert type(models["encoder"]) is type(enc) and type(models["discriminator"]) is type(disc)
    planes = torch.randn(1, 96, 32, 32)
    from utils.cameras import frontal_camera

    with torch.no_grad():
        a = ren(planes, frontal_camera())["image"]
        b = models["renderer"](planes, frontal_camera())["image"]
    assert torch.equal(a, b)  # same weights, same calls, same machine: bit-equal (measured 0)

    # back to the original 3dpe.pt layout (its 7 keys in order, loadable with weights_only=True, original key
    # order), then the architecture under one extra key the original code never reads
    rc, err = run_main(capsys, tmp_path / "proj", tmp_path / "out" / "3dpe.pt", "--to", "3dpe-pt")
    assert rc == 0, err
    obj = torch.load(tmp_path / "out" / "3dpe.pt", map_location="cpu", weights_only=True)
    top = [line.split("\t")[1] for line in (keys_dir / "checkpoint_top_level.tsv").read_text().splitlines()[1:]
           if line.startswith("3dpe.pt\t")]
    assert list(obj) == [*top, "threedpe_config"]
    assert set(obj["threedpe_config"]["config"]) == {"encoder", "renderer", "discriminator"}
    assert type(obj["encoder_state_dict"]) is collections.OrderedDict
    assert_same_sd(obj["encoder_state_dict"], enc.state_dict())
    assert_same_sd(obj["renderer_state_dict"], ren.state_dict())
    assert obj["step"] == 120000 and obj["opts"] == opts and obj["best_val_loss"] is None
    assert len(obj["encoder_optimizer"]["param_groups"][0]["params"]) == sum(
        k.startswith(("Final_encoder.", "Ref_encoder.")) for k in enc.state_dict())
    assert ck.detect_format(tmp_path / "out" / "3dpe.pt") == "3dpe"


@pytest.mark.parametrize("mode", ["LT", "Normal"])
def test_tiny_live3d_convert(tmp_path, mode, capsys):
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from models.live3d.encoder import Live3DConfig, Live3DEncoder

    torch.manual_seed(1)
    enc, ren = Live3DEncoder(Live3DConfig.tiny(mode)).eval(), TriplaneRenderer(RendererConfig.tiny())
    src = tmp_path / f"encoder_render_{mode}.pt"
    write_training_ckpt(src, "live3d", enc.state_dict(), ren.state_dict(), collections.OrderedDict(), {"seed": 42},
                        step=7, old_torch=True)
    fmt = f"live3d-{mode.lower()}"
    assert ck.detect_format(src) == fmt
    arch = arch_json(tmp_path / "arch.json", encoder=Live3DConfig.tiny(mode), renderer=RendererConfig.tiny())
    if mode == "LT":
        r = run_cli(src, tmp_path / "proj", "--config", arch)
        assert r.returncode == 0, r.stderr
    else:
        rc, err = run_main(capsys, src, tmp_path / "proj", "--config", arch)
        assert rc == 0, err
    back = ck.load_checkpoint(tmp_path / "proj")
    assert back.model_type == "live3d" and back.configs["encoder"].mode == mode
    assert back.meta["format"] == fmt
    assert_same_sd(back.components["encoder"], enc.state_dict())
    model = ck.build_models(back)["encoder"]
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), enc(x))
    # a 3dpe.pt export needs an editing encoder: clear error, non-zero exit
    rc, err = run_main(capsys, tmp_path / "proj", tmp_path / "x.pt", "--to", "3dpe-pt")
    assert rc != 0 and "3dpe" in err


def test_original_architecture_is_assumed_and_a_misfit_names_file_and_key(tmp_path, tiny_3dpe, capsys):
    """3dpe.pt records no architecture: the loader assumes the original's (full size), never a test one, and
    weights of another size fail in one line naming the file, the component and the first key that differs."""
    from models.editing.editing_encoder import EditingEncoderConfig
    from models.eg3d.config import RendererConfig

    enc, ren, disc = tiny_3dpe
    src = tmp_path / "small.pt"
    write_training_ckpt(src, "3dpe", enc.state_dict(), ren.state_dict(), disc.state_dict(), {}, step=0)
    c = ck.load_checkpoint(src)
    assert c.configs["encoder"] == EditingEncoderConfig() and c.configs["renderer"] == RendererConfig()
    assert c.meta["config_matched"] == {"encoder": None, "renderer": None, "discriminator": None}
    with pytest.raises(ConfigError) as e:
        ck.build_models(c, components=("renderer",), device="meta")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"'{src}': the 'renderer' weights do not fit TriplaneRenderer")
    assert "'const' is (1, 1, 16) in the file but (1, 1, 512) in the model" in msg and "--config" in msg
    # the converter checks before it writes a config.json that would not fit
    rc, err = run_main(capsys, src, tmp_path / "proj")
    assert rc != 0 and str(src) in err and "the 'encoder' weights do not fit" in err and "'encoder." in err
    assert not (tmp_path / "proj").exists()
    # told the architecture, the same file loads and builds
    c = ck.load_checkpoint(src, configs=tiny_3dpe_configs())
    assert c.meta["config_matched"] == {"encoder": True, "renderer": True, "discriminator": True}
    built = ck.build_models(c)
    for model, want in zip((built["encoder"], built["renderer"], built["discriminator"]), tiny_3dpe):
        assert_same_sd(model.state_dict(), want.state_dict())


def test_config_override_and_mismatch(tmp_path, tiny_3dpe, capsys):
    from models.eg3d.config import RendererConfig

    enc, ren, _ = tiny_3dpe
    cfg = RendererConfig.tiny()
    cfg.decoder_hidden = 8  # neither the original's architecture nor the tiny one
    from models.eg3d.triplane_renderer import TriplaneRenderer

    odd = TriplaneRenderer(cfg)
    src = tmp_path / "odd.pt"
    write_training_ckpt(src, "3dpe", enc.state_dict(), odd.state_dict(), collections.OrderedDict(), {}, step=0)
    c = ck.load_checkpoint(src)
    assert c.meta["config_matched"]["renderer"] is None
    with pytest.raises(ConfigError, match="--config"):
        ck.build_models(c, components=("renderer",))
    with pytest.raises(ConfigError, match=r"odd.pt': the 'renderer' .*'decoder\.net\.0\.weight' is \(8, 32\) in the file "
                                          r"but \(64, 32\) in the model"):
        ck.build_models(ck.load_checkpoint(src, configs={"renderer": RendererConfig.tiny()}), components=("renderer",))
    c = ck.load_checkpoint(src, configs={"renderer": cfg})
    assert ck.build_models(c, components=("renderer",))["renderer"].state_dict().keys() == odd.state_dict().keys()
    # the CLI takes the same override as JSON
    arch_json(tmp_path / "arch.json", renderer=cfg, encoder=tiny_3dpe_configs()["encoder"])
    rc, err = run_main(capsys, src, tmp_path / "proj", "--config", tmp_path / "arch.json")
    assert rc == 0, err
    assert ck.load_pretrained(tmp_path / "proj").configs["renderer"].decoder_hidden == 8


def test_save_pretrained_is_atomic_and_overwrites(tmp_path, tiny_3dpe):
    _, ren, _ = tiny_3dpe
    from models.eg3d.config import RendererConfig

    dst = tmp_path / "m"
    sd = ren.state_dict()
    ck.save_pretrained(dst, {"renderer": sd}, "live3d", {"renderer": RendererConfig.tiny()}, {"note": "first"})
    sd2 = collections.OrderedDict((k, v + 1) for k, v in sd.items())
    ck.save_pretrained(dst, {"renderer": sd2}, "live3d", {"renderer": RendererConfig.tiny()}, {"note": "second"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers
    back = ck.load_pretrained(dst)
    assert back.meta["note"] == "second"
    assert_same_sd(back.components["renderer"], sd2)
    with pytest.raises(ConfigError):
        ck.save_pretrained(tmp_path / "bad", {"renderer": sd}, "nonsense", {}, {})
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------------------
# EG3D: NVIDIA persistence pickle and the converted .pth
# ------------------------------------------------------------------------------------------------------------
_FAKE = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training.triplane")


@contextlib.contextmanager
def nvidia_modules():
    """Fake NVIDIA modules present in sys.modules only while dumping."""
    with fake_modules(_FAKE) as mods:

        class EasyDict(dict):
            pass

        class OSGDecoder:
            pass

        for cls, mod in ((EasyDict, "dnnlib.util"), (OSGDecoder, "training.triplane")):
            cls.__module__, cls.__qualname__ = mod, cls.__name__
            setattr(mods[mod], cls.__name__, cls)
        yield types.SimpleNamespace(EasyDict=EasyDict, OSGDecoder=OSGDecoder,
                                    reconstruct=mods["torch_utils.persistence"]._reconstruct_persistent_obj)


class _Record:
    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return (self.reconstruct, (self.meta,))


def _module_state(m: nn.Module, ns) -> dict:
    return {
        "training": False,
        "_parameters": collections.OrderedDict((k, v.detach() if v is not None else None) for k, v in m._parameters.items()),
        "_buffers": collections.OrderedDict(m._buffers),
        "_non_persistent_buffers_set": set(m._non_persistent_buffers_set),
        "_backward_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict((k, as_nvidia(c, ns)) for k, c in m._modules.items()),
    }


def as_nvidia(m: nn.Module, ns, extra: dict | None = None):
    """Our module tree dressed as NVIDIA's pickle: persistent records, OSGDecoder/torch.nn stubs."""
    state = _module_state(m, ns)
    state.update(extra or {})
    name = type(m).__name__
    if isinstance(m, (nn.Sequential, nn.Softplus)):
        obj = type(m).__new__(type(m))
        obj.__dict__.update(state)
        return obj
    if name == "OSGDecoder":
        obj = ns.OSGDecoder()
        obj.__dict__.update(state)
        return obj
    state.setdefault("_init_args", ())
    state.setdefault("_init_kwargs", ns.EasyDict())
    meta = dict(type="class", version=6, module_src=f"# {name}\n", class_name=name, state=state)
    return _Record(ns.reconstruct, meta)


def eg3d_init_kwargs(ns, cfg) -> dict:
    _, kw = ck.eg3d_kwargs_from_config(cfg)
    kw["mapping_kwargs"] = ns.EasyDict(kw["mapping_kwargs"])
    kw["sr_kwargs"] = ns.EasyDict(kw["sr_kwargs"])
    kw["rendering_kwargs"] = ns.EasyDict(kw["rendering_kwargs"])
    kw["sr_num_fp16_res"] = np.int64(0)
    return kw


@pytest.fixture(scope="module")
def tiny_eg3d():
    from models.discriminator import DiscriminatorConfig, DualDiscriminator

    g = perturbed_tiny_generator(3)
    d = DualDiscriminator(DiscriminatorConfig.tiny()).eval()
    return g, d


def write_nvidia_pkl(path: Path, g: nn.Module, d: nn.Module) -> None:
    with nvidia_modules() as ns:
        kw = eg3d_init_kwargs(ns, g.config)
        extra = {"_init_args": (), "_init_kwargs": kw, "rendering_kwargs": ns.EasyDict(kw["rendering_kwargs"]),
                 "neural_rendering_resolution": g.config.neural_rendering_resolution, "_last_planes": None,
                 "z_dim": np.int64(g.config.z_dim)}
        d_kw = ns.EasyDict(c_dim=25, img_resolution=d.config.img_resolution, img_channels=3,
                           channel_base=d.config.channel_base, channel_max=d.config.channel_max,
                           mapping_kwargs=ns.EasyDict(num_layers=d.config.mapping_layers))
        snap = {"training_set_kwargs": ns.EasyDict(resolution=64), "G": as_nvidia(g, ns, dict(extra)),
                "D": as_nvidia(d, ns, {"_init_args": (), "_init_kwargs": d_kw}),
                "G_ema": as_nvidia(g, ns, dict(extra)), "augment_pipe": None}
        path.write_bytes(pickle.dumps(snap, protocol=4))


def test_eg3d_pkl_convert_and_build(tmp_path, tiny_eg3d, capsys):
    g, d = tiny_eg3d
    pkl = tmp_path / "network-snapshot.pkl"
    write_nvidia_pkl(pkl, g, d)
    assert b"torch_utils.persistence" in pkl.read_bytes()[:100000]
    assert ck.detect_format(pkl) == "eg3d-pkl"
    c = ck.load_checkpoint(pkl)
    assert (c.format, c.model_type) == ("eg3d-pkl", "eg3d")
    assert_same_sd(c.components["generator"], g.state_dict())
    assert_same_sd(c.components["discriminator"], d.state_dict())
    assert c.meta["config_matched"] == {"generator": True, "discriminator": True}
    assert c.meta["neural_rendering_resolution"] == g.config.neural_rendering_resolution

    r = run_cli(pkl, tmp_path / "proj")
    assert r.returncode == 0, r.stderr
    back = ck.load_checkpoint(tmp_path / "proj")
    assert back.model_type == "eg3d" and back.meta["format"] == "eg3d-pkl"
    assert back.meta["eg3d"]["G_init_kwargs"]["mapping_kwargs"]["num_layers"] == g.config.mapping_layers
    assert_same_sd(back.components["generator"], g.state_dict())
    g2 = ck.build_models(back)["generator"]
    z, c_ = torch.randn(1, g.config.z_dim), torch.zeros(1, 25)
    with torch.no_grad():
        ws = g.mapping(z, c_)
        assert torch.equal(g2.mapping(z, c_), ws)
        assert torch.equal(g2.synthesize_planes(ws), g.synthesize_planes(ws))

    # and on to the original converted .pth
    rc, err = run_main(capsys, tmp_path / "proj", tmp_path / "eg3d.pth", "--to", "eg3d-pth")
    assert rc == 0, err
    obj = safe_torch_load(tmp_path / "eg3d.pth")
    assert list(obj) == ["G_init_args", "G_init_kwargs", "G", "G_neural_rendering_resolution",
                         "G_renderinig_kwargs", "D_init_args", "D_init_kwargs", "D"]
    assert "dataset_label_std" not in obj["G"] and len(obj["G"]) == len(g.state_dict()) - 1
    assert obj["G_init_kwargs"].mapping_kwargs.num_layers == g.config.mapping_layers  # an EasyDict
    with zipfile.ZipFile(tmp_path / "eg3d.pth") as z:
        assert b"dnnlib.util\nEasyDict" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    c3 = ck.load_checkpoint(tmp_path / "eg3d.pth")
    assert c3.format == "eg3d-pth" and c3.meta["config_matched"]["generator"] is True
    sd3 = c3.components["generator"]
    assert all(torch.equal(sd3[k], v) for k, v in g.state_dict().items() if k != "dataset_label_std")
    assert_same_sd(c3.components["discriminator"], d.state_dict())


def test_converted_pth_written_by_original_layout(tmp_path, tiny_eg3d):
    g, _ = tiny_eg3d
    sd = collections.OrderedDict((k, v) for k, v in g.state_dict().items() if k != "dataset_label_std")
    with nvidia_modules() as ns:
        kw = eg3d_init_kwargs(ns, g.config)
        obj = {"G_init_args": (), "G_init_kwargs": ns.EasyDict(kw), "G": sd, "G_neural_rendering_resolution": 16,
               "G_renderinig_kwargs": kw["rendering_kwargs"], "D_init_args": (), "D_init_kwargs": ns.EasyDict(),
               "D": collections.OrderedDict()}
        torch.save(obj, tmp_path / "ffhqrebalanced512-128.pth")
    assert ck.detect_format(tmp_path / "ffhqrebalanced512-128.pth") == "eg3d-pth"
    c = ck.load_checkpoint(tmp_path / "ffhqrebalanced512-128.pth")
    assert list(c.components) == ["generator"] and c.meta["added_dataset_label_std"]
    gen = ck.build_models(c)["generator"]
    assert gen.neural_rendering_resolution == 16


def test_refused_pickle_cli(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": Evil()}))
    with pytest.raises(UnsafePickleError):
        ck.load_checkpoint(tmp_path / "evil.pkl")
    r = run_cli(tmp_path / "evil.pkl", tmp_path / "out")
    assert r.returncode != 0
    assert "system" in r.stderr and "refused" in r.stderr
    torch.save({"G_init_kwargs": Evil(), "G": {}}, tmp_path / "evil.pth")
    rc, err = run_main(capsys, tmp_path / "evil.pth", tmp_path / "out")
    assert rc != 0 and "system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    rc, err = run_main(capsys, tmp_path / "missing.pkl", tmp_path / "out")
    assert rc != 0 and "missing.pkl" in err
