"""The EG3D sampler CLI on a tiny generator: files, keys, shapes, seeds, determinism."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, perturbed_tiny_generator
from tools.eg3d_samples import main, sample_seed
from utils.config import parse_seeds
from models import checkpoint as ck


@pytest.fixture(scope="module")
def tiny_generator():
    return perturbed_tiny_generator(5)


@pytest.fixture(scope="module")
def tiny_network(tmp_path_factory, tiny_generator):
    d = tmp_path_factory.mktemp("net") / "tiny-eg3d"
    ck.save_pretrained(d, {"generator": tiny_generator.state_dict()}, "eg3d", {"generator": tiny_generator.config},
                       {"format": "test"})
    return d


def test_parse_seeds():
    assert parse_seeds("11-12") == [11, 12]
    assert parse_seeds("1,3,5-7") == [1, 3, 5, 6, 7]
    with pytest.raises(ValueError):
        parse_seeds("5-3")


def test_cli_writes_png_and_tensors(tmp_path, tiny_network, tiny_generator):
    out = tmp_path / "out"
    # the test's thread count: CPU kernels split their sums by it, so the subprocess computes what this process does
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-m", "tools.eg3d_samples", "--network", str(tiny_network), "--seeds", "11-12",
                        "--outdir", str(out), "--yaws", "-20", "0", "20", "--pitch", "5", "--save-tensors",
                        "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = tiny_generator.config
    res, raw, p = cfg.img_resolution, cfg.neural_rendering_resolution, cfg.plane_resolution
    for seed in (11, 12):
        png = Image.open(out / f"seed{seed:04d}.png")
        assert png.size == (3 * res, res) and png.mode == "RGB"
        t = load_file(str(out / f"seed{seed:04d}.safetensors"))
        assert set(t) == {"planes", "image", "image_raw", "image_depth"}
        assert t["planes"].shape == (1, 96, p, p)
        assert t["image"].shape == (3, 3, res, res)
        assert t["image_raw"].shape == (3, 3, raw, raw)
        assert t["image_depth"].shape == (3, 1, raw, raw)
        # the png is the uint8 conversion of the saved images, views side by side in --yaws order
        want = torch.round((t["image"].clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
        got = torch.from_numpy(np.array(png)).permute(2, 0, 1)
        for v in range(3):
            assert torch.equal(got[:, :, v * res:(v + 1) * res], want[v])
        ray = tiny_generator.config.rendering
        assert t["image_depth"].min() >= ray.ray_start - 1e-4 and t["image_depth"].max() <= ray.ray_end + 1e-4
    a, b = load_file(str(out / "seed0011.safetensors")), load_file(str(out / "seed0012.safetensors"))
    assert not torch.equal(a["planes"], b["planes"])  # different seeds, different z

    # the library call's numbers (z from RandomState(seed), frontal conditioning, deterministic): the same weights,
    # ops and thread count, so bit-equal on any CPU
    direct = sample_seed(tiny_generator, 11, (-20, 0, 20), 5.0, 0.7, 14)
    for k in a:
        assert torch.equal(direct[k], a[k]), k


def test_views_match_single_renders_and_pth_network(tmp_path, tiny_generator, capsys):
    from utils.cameras import FOCAL_EG3D_LABEL, look_at_cameras

    ck.write_eg3d_pth(tmp_path / "g.pth", tiny_generator.state_dict(),
                      *ck.eg3d_kwargs_from_config(tiny_generator.config),
                      neural_rendering_resolution=tiny_generator.config.neural_rendering_resolution)
    rc = main(["--network", str(tmp_path / "g.pth"), "--seeds", "3", "--outdir", str(tmp_path / "o"),
               "--yaws", "10", "--trunc", "1", "--save-tensors", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    t = load_file(str(tmp_path / "o" / "seed0003.safetensors"))
    g = tiny_generator
    z = torch.from_numpy(np.random.RandomState(3).randn(1, g.config.z_dim)).float()
    with torch.no_grad():
        ws = g.mapping(z, look_at_cameras(math.pi / 2, math.pi / 2, focal=FOCAL_EG3D_LABEL), truncation_psi=1.0)
        planes = g.synthesize_planes(ws, noise_mode="const")
        cam = look_at_cameras(math.pi / 2 + math.radians(10), math.pi / 2, focal=FOCAL_EG3D_LABEL)
        out = g.render_planes(planes, cam, ws, deterministic=True)
    # the CLI's calls are these (same weights, cameras, batch of 1 and threads): bit-equal on any CPU
    assert torch.equal(t["planes"], planes)
    assert torch.equal(t["image"], out["image"])


def test_network_without_generator_fails(tmp_path, capsys):
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    ren = TriplaneRenderer(RendererConfig.tiny())
    ck.save_pretrained(tmp_path / "r", {"renderer": ren.state_dict()}, "live3d", {"renderer": RendererConfig.tiny()}, {})
    rc = main(["--network", str(tmp_path / "r"), "--seeds", "1", "--outdir", str(tmp_path / "o")])
    assert rc == 2 and "generator" in _error_line(capsys.readouterr().err)
    rc = main(["--network", str(tmp_path / "missing.pkl"), "--seeds", "1", "--outdir", str(tmp_path / "o")])
    assert rc == 2 and f"'{tmp_path / 'missing.pkl'}' does not exist" in _error_line(capsys.readouterr().err)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_tiny_random_network_is_datagens_and_one_process_prints_a_summary(tmp_path, capsys):
    """`--network tiny-random` is the tiny generator datagen builds for that name; the files written, then one
    summary line, are printed without torchrun too."""
    from pipelines.datagen import build_generator
    from pipelines.datagen_config import TINY, SourceConfig

    out = tmp_path / "x"
    rc = main(["--network", TINY, "--seeds", "0-1", "--outdir", str(out), "--save-tensors", "--device", "cpu"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert printed.out.splitlines() == [str(out / "seed0000.png"), str(out / "seed0000.safetensors"),
                                        str(out / "seed0001.png"), str(out / "seed0001.safetensors"),
                                        f"done: 2 seeds written to {out}/"]
    direct = sample_seed(build_generator(SourceConfig(network=TINY), torch.device("cpu")), 1)
    saved = load_file(str(out / "seed0001.safetensors"))
    for k in saved:
        assert torch.equal(direct[k], saved[k]), k
