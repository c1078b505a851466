"""Files the project writes load back with no extra flag, and files cut short fail in one line naming them.

One tiny training run (1 step) writes what a real run writes: `final/` (project format), `3dpe.pt` (the
original layout plus the recorded architecture) and `checkpoints/step_00000001/` (snapshot + training state).
No test here uses the `tiny_original_architectures` fixture: these files record their architecture.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from models import checkpoint as ck
from utils.errors import CorruptCheckpointError

TINY = ROOT / "configs" / "train_tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A 1-step tiny training run: its folder, data and the paths of what it wrote."""
    from tests.training.test_training import make_tiny_dataset, tiny_config
    from training.train import main

    tmp = tmp_path_factory.mktemp("run")
    data = make_tiny_dataset(tmp / "data", n_portraits=4)
    d = main(tiny_config(data, tmp / "exps", "t", "max_steps=1")).run_dir
    return {"dir": d, "data": data, "exps": tmp / "exps", "pt": d / "3dpe.pt", "final": d / "final",
            "step": d / "checkpoints" / "step_00000001"}


@pytest.fixture(scope="module")
def portraits(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for sub in ("input", "ref"):
        (d / sub).mkdir()
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / sub / "a.png")
    return d


def assert_same_components(a: ck.LoadedCheckpoint, b: ck.LoadedCheckpoint, components=("encoder", "renderer")):
    for comp in components:
        sa, sb = a.components[comp], b.components[comp]
        assert list(sa) == list(sb), comp
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp


# ------------------------------------------------------------------------------------------------------------
# 1. what a run writes loads back, with no --config
# ------------------------------------------------------------------------------------------------------------
def test_run_3dpe_pt_records_its_architecture_and_loads_back(run):
    obj = torch.load(run["pt"], map_location="cpu", weights_only=True)
    assert list(obj)[:7] == ["encoder_state_dict", "renderer_state_dict", "discriminator_state", "opts",
                             "best_val_loss", "step", "encoder_optimizer"]  # the original's keys first
    assert list(obj)[7:] == ["threedpe_config"]
    final = ck.load_checkpoint(run["final"])
    c = ck.load_checkpoint(run["pt"])
    assert c.meta["config_matched"] == {"encoder": True, "renderer": True, "discriminator": True}
    assert c.configs["encoder"] == final.configs["encoder"] and c.configs["renderer"] == final.configs["renderer"]
    assert_same_components(c, final)
    d_trained = torch.load(run["step"] / "training_state.pt", weights_only=True)["discriminator"]  # same step
    d_built = ck.build_models(c)["discriminator"].state_dict()
    assert list(d_built) == list(d_trained) and all(torch.equal(v, d_trained[k]) for k, v in d_built.items())


def _edit(checkpoint: Path, portraits: Path, out: Path, capsys) -> dict[str, str]:
    import test_scripts

    rc = test_scripts.main(["--checkpoint", str(checkpoint), "--data-dir", str(portraits), "--output-dir", str(out),
                            "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}


def test_test_scripts_edits_with_the_run_3dpe_pt_like_with_its_final_folder(run, portraits, tmp_path, capsys):
    from_pt = _edit(run["pt"], portraits, tmp_path / "pt", capsys)
    assert from_pt and from_pt == _edit(run["final"], portraits, tmp_path / "final", capsys)  # same weights


def test_converter_reads_the_run_3dpe_pt_without_and_with_config(run, tmp_path, capsys):
    from tools.convert_checkpoint import main

    assert main([str(run["pt"]), str(tmp_path / "a")]) == 0, capsys.readouterr().err
    src = ck.load_checkpoint(run["pt"])
    back = ck.load_checkpoint(tmp_path / "a")
    assert back.configs == src.configs
    assert_same_components(back, src, ("encoder", "renderer", "discriminator"))
    # the documented --config: the run's own final/config.json (encoder + renderer; the file adds its D)
    assert main([str(run["pt"]), str(tmp_path / "b"), "--config", str(run["final"] / "config.json")]) == 0, \
        capsys.readouterr().err
    assert ck.load_checkpoint(tmp_path / "b").configs == src.configs
    # and back to 3dpe.pt: the architecture travels with it
    assert main([str(tmp_path / "a"), str(tmp_path / "c.pt"), "--to", "3dpe-pt"]) == 0, capsys.readouterr().err
    again = ck.load_checkpoint(tmp_path / "c.pt")
    assert again.configs == src.configs and again.meta["config_matched"]["encoder"] is True
    assert_same_components(again, src, ("encoder", "renderer", "discriminator"))


def test_config_json_for_files_that_record_no_architecture(run, tmp_path, capsys):
    """A 3dpe.pt without the recorded architecture (as written before it was recorded): --config with the
    run's final/config.json is enough, its discriminator read off the weights; a config.json naming a
    discriminator the file lacks works too. Without --config: one line naming the file and the key."""
    from models.discriminator import DiscriminatorConfig
    from tools.convert_checkpoint import main

    obj = torch.load(run["pt"], map_location="cpu", weights_only=True)
    del obj["threedpe_config"]
    torch.save(obj, tmp_path / "old.pt")
    assert main([str(tmp_path / "old.pt"), str(tmp_path / "a"), "--config", str(run["final"] / "config.json")]) == 0, \
        capsys.readouterr().err
    back = ck.load_checkpoint(tmp_path / "a")
    assert back.configs["discriminator"] == DiscriminatorConfig.tiny(64)
    assert_same_components(back, ck.load_checkpoint(run["pt"]), ("encoder", "renderer", "discriminator"))

    obj["discriminator_state"] = {}
    torch.save(obj, tmp_path / "no_d.pt")
    assert main([str(tmp_path / "no_d.pt"), str(tmp_path / "b"), "--config", str(tmp_path / "a" / "config.json")]) == 0
    assert sorted(ck.load_checkpoint(tmp_path / "b").components) == ["encoder", "renderer"]

    capsys.readouterr()
    assert main([str(tmp_path / "old.pt"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: '{tmp_path / 'old.pt'}': the 'encoder' weights do not fit")
    assert not (tmp_path / "c").exists()


def test_architecture_entry_round_trips_full_size_configs():
    """Full-size configs (the released model's) survive the entry: what the original's loader ignores."""
    from models.checkpoint.original import recorded_configs
    from models.checkpoint.project import config_header
    from models.discriminator import DiscriminatorConfig
    from models.editing.editing_encoder import EditingEncoderConfig
    from models.eg3d.config import RendererConfig

    for enc in (EditingEncoderConfig(), EditingEncoderConfig(prompt_encoder="clip")):
        cfgs = {"encoder": enc, "renderer": RendererConfig(), "discriminator": DiscriminatorConfig()}
        assert recorded_configs({"threedpe_config": config_header("3dpe", cfgs)}, "3dpe", "x.pt") == cfgs
    assert recorded_configs({}, "3dpe", "x.pt") == {}  # the original release: nothing recorded


@pytest.mark.parametrize("cfg", [
    dict(), dict(channel_base=256, channel_max=32, mapping_layers=2, img_resolution=64),
    dict(channel_base=512, channel_max=64, mapping_layers=3, img_resolution=32, cmap_dim=16, mbstd_num_channels=2),
])
@pytest.mark.parametrize("model_type", ["3dpe", "live3d"])
def test_discriminator_config_is_read_off_its_weights(cfg, model_type):
    from models.checkpoint.original import discriminator_config_from_weights

    want = ck.config_class(model_type, "discriminator")(**cfg)
    with torch.device("meta"):
        sd = ck.model_class(model_type, "discriminator")(want).state_dict()
    assert discriminator_config_from_weights(model_type, sd) == want
    assert discriminator_config_from_weights(model_type, {"w": torch.zeros(1)}) is None


# ------------------------------------------------------------------------------------------------------------
# 2. files cut short: one line naming the file and what to do, exit code 2
# ------------------------------------------------------------------------------------------------------------
def cut_in_half(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def half_files(run, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """format → (the path to load, the file cut in half) for every format the loaders read."""
    from models.discriminator import DiscriminatorConfig, DualDiscriminator
    from models.eg3d.config import GeneratorConfig
    from models.eg3d.generator import TriPlaneGenerator
    from tests.models.checkpoint.test_checkpoint import write_nvidia_pkl

    tmp = tmp_path_factory.mktemp("half")
    torch.manual_seed(0)
    g, d = TriPlaneGenerator(GeneratorConfig.tiny()), DualDiscriminator(DiscriminatorConfig.tiny())
    pth = ck.write_eg3d_pth(tmp / "full" / "eg3d.pth", g.state_dict(), *ck.eg3d_kwargs_from_config(g.config))
    write_nvidia_pkl(tmp / "full" / "network.pkl", g, d)
    out = {
        "3dpe.pt": cut_in_half(run["pt"], tmp / "3dpe.pt"),
        "eg3d.pth": cut_in_half(pth, tmp / "eg3d.pth"),
        "eg3d.pkl": cut_in_half(tmp / "full" / "network.pkl", tmp / "network.pkl"),
    }
    folder = tmp / "final"
    shutil.copytree(run["final"], folder)
    cut_in_half(run["final"] / "model.safetensors", folder / "model.safetensors")
    cfg_folder = tmp / "final_cfg"
    shutil.copytree(run["final"], cfg_folder)
    cut_in_half(run["final"] / "config.json", cfg_folder / "config.json")
    return {**{k: (v, v) for k, v in out.items()}, "safetensors": (folder, folder / "model.safetensors"),
            "config.json": (cfg_folder, cfg_folder / "config.json")}


FORMATS = ["3dpe.pt", "eg3d.pth", "eg3d.pkl", "safetensors", "config.json"]


def assert_one_line(err: str, bad: Path) -> None:
    """stderr ends with exactly one error line (progress lines such as 'loading the models: ...' may precede it),
    which names the file, says it is incomplete or corrupt, and what to do; no traceback."""
    lines = err.splitlines()
    assert [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln] == lines[-1:], err
    assert lines[-1].startswith(f"error: '{bad}' is incomplete or corrupt ("), err
    again = "the whole folder" if bad.name in ("config.json", "model.safetensors") else "download or copy it again"
    assert again in lines[-1], err


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_file_loader_error(half_files, fmt):
    path, bad = half_files[fmt]
    with pytest.raises(CorruptCheckpointError) as e:
        ck.load_checkpoint(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"'{bad}' is incomplete or corrupt (")


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_file_converter_one_line(half_files, fmt, tmp_path, capsys):
    from tools.convert_checkpoint import main

    path, bad = half_files[fmt]
    assert main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # the converter prints nothing else
    assert_one_line(err, bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_file_test_scripts_one_line(half_files, fmt, portraits, tmp_path, capsys):
    import test_scripts

    path, bad = half_files[fmt]
    rc = test_scripts.main(["--checkpoint", str(path), "--data-dir", str(portraits), "--output-dir",
                            str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    assert_one_line(capsys.readouterr().err, bad)


def test_half_file_command_lines_in_subprocesses(half_files, portraits, tmp_path):
    """The real command lines: one line on stderr, the file named, exit code 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    _, bad = half_files["3dpe.pt"]
    for cmd in ([sys.executable, "test_scripts.py", "--checkpoint", str(bad), "--data-dir", str(portraits),
                 "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
                [sys.executable, "-m", "tools.convert_checkpoint", str(bad), str(tmp_path / "conv")]):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert_one_line(r.stderr, bad)


@pytest.mark.parametrize("part", ["training_state.pt", "model.safetensors"])
def test_half_run_checkpoint_resume_says_resume_from_the_previous_one(run, part, tmp_path, capsys):
    """`train_scripts.py train --resume` on a run whose newest checkpoint was cut short: one line naming the
    file and the fix (move that checkpoint aside, resume from the previous one), exit code 2."""
    import train_scripts

    exps = tmp_path / "exps"
    shutil.copytree(run["dir"], exps / "t")
    step = exps / "t" / "checkpoints" / run["step"].name
    bad = cut_in_half(run["step"] / part, step / part)
    capsys.readouterr()
    rc = train_scripts.main(["train", "--config", str(TINY), f"data.train_root={run['data']}", f"exp_dir={exps}",
                             "name=t", "max_steps=2", "--resume"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: '{bad}' is incomplete or corrupt ("), err
    assert f"training checkpoint '{step}'" in err and "resume again" in err and "previous checkpoint" in err


def test_empty_file_is_corrupt_not_unknown(tmp_path):
    (tmp_path / "3dpe.pt").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="the file is empty"):
        ck.detect_format(tmp_path / "3dpe.pt")
