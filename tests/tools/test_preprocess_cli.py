"""tools.preprocess CLI: outputs, dataset.json, summary, exit codes, landmark files, all faces."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.face_alignment import STANDARD_LANDMARKS_3D, eg3d_crop
from tools.preprocess import EXIT_FAILED, EXIT_OK, main

ROOT = Path(__file__).resolve().parents[2]
FRONTAL_LABEL = [1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1, 4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]

pytest.importorskip("facenet_pytorch")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture()
def photos(tmp_path, astronaut) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(astronaut).save(d / "astronaut.png")
    # the same photo stored rotated, with an EXIF tag saying "rotate 90° clockwise to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut, 1))).save(d / "astronaut_rot.png", exif=exif.tobytes())
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "noise.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (d / "notes.txt").write_text("not an image, ignored")
    return d


def test_cli_mixed_folder(photos, tmp_path, capsys):
    out = tmp_path / "aligned"
    code = main(["--indir", str(photos), "--outdir", str(out), "--no-progress", "--device", "cpu"])
    assert code == EXIT_FAILED  # a file was unreadable
    captured = capsys.readouterr()
    summary = captured.out + captured.err
    assert "noise.png" in summary and "corrupt.jpg" in summary
    assert "aligned 2 face(s) from 3 image(s)" in summary
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "astronaut_rot.png", "dataset.json"]
    a = np.asarray(Image.open(out / "astronaut.png"))
    b = np.asarray(Image.open(out / "astronaut_rot.png"))
    assert a.shape == (512, 512, 3)
    np.testing.assert_array_equal(a, b)  # EXIF rotation applied before detection and crop
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert [name for name, _ in labels] == ["astronaut.png", "astronaut_rot.png"]
    for _, label in labels:
        # utils.cameras.frontal_camera in float32: each entry ≤ 2 roundings of ≤ 2.7, or 2.7 × the cosine of π/2
        # rounded to float32 (±1 ulp of arccos/sin/cos: ≤ 1.6e-7), or 4.2647 rounded (2.4e-7): ≤ 4.4e-7 on any CPU.
        # Measured 1.2e-7.
        np.testing.assert_allclose(label, FRONTAL_LABEL, atol=1e-6)

    # without the corrupt file the no-face image alone does not fail the run
    (photos / "corrupt.jpg").unlink()
    assert main(["--indir", str(photos), "--outdir", str(out), "--no-progress", "--estimate-pose"]) == EXIT_OK
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert len(labels) == 2 and all(len(lab) == 25 for _, lab in labels)


def test_cli_nothing_found(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(d / "grey.png")
    out = tmp_path / "out"
    assert main(["--indir", str(d), "--outdir", str(out), "--no-progress"]) == EXIT_FAILED
    assert "grey.png" in capsys.readouterr().out
    assert json.loads((out / "dataset.json").read_text()) == {"labels": []}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--indir", str(empty), "--outdir", str(out), "--no-progress"]) == EXIT_FAILED


def test_cli_landmarks_dir_and_all_faces(tmp_path, astronaut):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(img).save(d / "synthetic.png")
    big = np.stack([200 + 90 * STANDARD_LANDMARKS_3D[:, 0], 150 - 90 * STANDARD_LANDMARKS_3D[:, 1]], 1)
    small = big * 0.4 + 20
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    (lm_dir / "synthetic.txt").write_text("\n".join(f"{x} {y}" for x, y in np.concatenate([big, small])))
    out = tmp_path / "out"
    code = main(["--indir", str(d), "--outdir", str(out), "--landmarks-dir", str(lm_dir), "--all-faces", "--no-progress"])
    assert code == EXIT_OK
    names = [n for n, _ in json.loads((out / "dataset.json").read_text())["labels"]]
    assert names == ["synthetic.png", "synthetic_face1.png"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "synthetic.png")), np.asarray(eg3d_crop(Image.fromarray(img), big))
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "synthetic_face1.png")), np.asarray(eg3d_crop(Image.fromarray(img), small))
    )

    # MTCNN, two real faces side by side, --all-faces
    group = Image.new("RGB", (1024, 512), (255, 255, 255))
    group.paste(Image.fromarray(astronaut), (0, 0))
    group.paste(Image.fromarray(astronaut).resize((256, 256), Image.BICUBIC), (640, 128))
    g = tmp_path / "group"
    g.mkdir()
    group.save(g / "group.jpg", quality=95)
    out2 = tmp_path / "out2"
    assert main(["--indir", str(g / "group.jpg"), "--outdir", str(out2), "--all-faces", "--no-progress"]) == EXIT_OK
    assert sorted(p.name for p in out2.iterdir()) == ["dataset.json", "group.png", "group_face1.png"]


def test_cli_as_module_help_and_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    helptext = subprocess.run(
        [sys.executable, "-m", "tools.preprocess", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "exit status" in helptext and "--all-faces" in helptext and "--device" in helptext
    d = tmp_path / "in"
    d.mkdir()
    Image.open(ROOT / "test_imgs" / "input" / "hopper.png").save(d / "hopper.jpg", quality=95)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.preprocess", "--indir", str(d), "--outdir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "aligned 1 face(s)" in proc.stdout
    assert (out / "hopper.png").is_file()



def test_cli_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--indir", str(tmp_path / "nope"), "--outdir", str(tmp_path / "out")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--indir", str(tmp_path), "--outdir", str(tmp_path / "o"), "--landmarks-dir", str(tmp_path / "missing")])
