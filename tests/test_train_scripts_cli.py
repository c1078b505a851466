"""`train_scripts.py` as a user runs it: a user error is one line and a non-zero exit (never a traceback),
and `datagen` is `python -m tools.datagen` (same summary, `--merge-only`, exit 1 when units failed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.layout import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TINY = ROOT / "configs" / "train_tiny.yaml"
DATAGEN_TINY = ROOT / "configs" / "datagen_tiny.yaml"
CUSTOMIZE = ROOT / "configs" / "customize.yaml"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train_scripts.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("argv, expect", [
    (["train", "--config", str(TRAIN_TINY), "data.bogus=1"], "unknown key 'bogus'"),
    (["train", "--config", str(TRAIN_TINY), "--nproc", "2", "optim.lr=fast"], "optim.lr: expected float"),
    (["train", "--config", str(TRAIN_TINY), "optim.schedule=cosin"],
     "optim.schedule: 'cosin' is not one of 'constant', 'cosine'"),
    (["train", "--config", str(TRAIN_TINY), "stop_after=2"], "'stop_after' is no longer a setting"),
    (["customize", "--config", str(CUSTOMIZE), "train.max_steps=many"], "train.max_steps: expected int"),
    (["datagen", "--config", str(DATAGEN_TINY), "edit.nope=1"], "unknown key 'nope'"),
    (["datagen", "--config", str(DATAGEN_TINY), "source.seeds=5-3"], "'5-3' runs backwards"),
    (["train", "--config", "configs/missing.yaml"], "config file 'configs/missing.yaml' not found"),
    (["train", "--config", str(TRAIN_TINY)], "data.train_root='' holds no dataset.json: pass data.train_root=DIR"),
    (["train", "--config", str(TRAIN_TINY), "data.train_root=no/such/dir"],
     "data.train_root='no/such/dir' holds no dataset.json"),
])
def test_config_errors_are_one_line_without_traceback(tmp_path, argv, expect):
    proc = _script(*argv, f"{'train.' if argv[0] == 'customize' else ''}"
                          f"{'output_dir' if argv[0] == 'datagen' else 'exp_dir'}={tmp_path}")
    assert proc.returncode == 2
    assert expect in _one_error_line(proc)


def test_an_unknown_override_key_is_named_as_the_command_line_override(tmp_path):
    proc = _script("train", "--config", "configs/train_tiny.yaml", "foo.bar=1", f"exp_dir={tmp_path}")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith("error: command-line override 'foo.bar=1': unknown key 'foo' (valid: "), line
    assert "train_tiny.yaml" not in line
    assert not (tmp_path / "tiny").exists()  # nothing started


def _photos(root: Path, broken: bool) -> Path:
    """Two aligned 'photos' with labels; with `broken`, the second file is not an image (its units fail)."""
    root.mkdir(parents=True)
    labels = []
    for i in range(2):
        rel = f"p{i}.png"
        Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype(np.uint8)).save(root / rel)
        labels.append([rel, [float(i)] * 25])
    if broken:
        (root / "p1.png").write_bytes(b"not a png")
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def _datagen_overrides(photos: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", "source.kind=photos", f"source.photos_dir={photos}", "source.dir_name=ffhq",
            "source.resolution=64", "edit.edit_types=[pixar]", "batch_size=1"]


def _summary(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    s = json.loads(lines[-1])
    for timing in ("edit_seconds", "edits_per_second"):
        s.pop(timing)
    return s


def test_datagen_is_the_module_cli_and_fails_with_failed_units(tmp_path, capsys):
    import train_scripts
    from tools import datagen

    photos = _photos(tmp_path / "photos", broken=True)
    capsys.readouterr()
    rc_module = datagen.cli(["--config", str(DATAGEN_TINY), *_datagen_overrides(photos, tmp_path / "a")])
    module_out = capsys.readouterr().out
    rc_script = train_scripts.main(["datagen", "--config", str(DATAGEN_TINY),
                                    *_datagen_overrides(photos, tmp_path / "b")])
    script_out = capsys.readouterr().out
    assert rc_module == rc_script == 1
    summary = _summary(script_out)
    assert summary["failed"] == 1 and summary["done"] == 1
    assert {k: v for k, v in summary.items() if k != "merged"} == \
           {k: v for k, v in _summary(module_out).items() if k != "merged"}
    assert summary["merged"]["inputs"] == 1


def test_datagen_merge_only(tmp_path, capsys):
    import train_scripts
    from tools import datagen

    outs = []
    for name in ("a", "b"):  # what a finished shard leaves: an input, its label line and its manifest line
        out = tmp_path / name
        (out / "ffhq").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(out / "ffhq" / "p0.png")
        (out / "labels.0.jsonl").write_text(json.dumps({"path": "ffhq/p0.png", "label": [0.5] * 25}) + "\n")
        (out / "manifest.0.jsonl").write_text(json.dumps({"input": "ffhq/p0.png", "edit_type": "pixar", "variant": 0,
                                                          "kept": True, "unit_status": "kept"}) + "\n")
        outs.append(out)
    capsys.readouterr()
    assert datagen.cli(["--config", str(DATAGEN_TINY), "--merge-only", f"output_dir={outs[0]}"]) == 0
    module_out = capsys.readouterr().out
    assert train_scripts.main(["datagen", "--config", str(DATAGEN_TINY), "--merge-only",
                               f"output_dir={outs[1]}"]) == 0
    script_out = capsys.readouterr().out
    assert json.loads(script_out) == json.loads(module_out) and json.loads(script_out)["inputs"] == 1
    assert json.loads((outs[1] / "dataset.json").read_text()) == {"labels": [["ffhq/p0.png", [0.5] * 25]]}
    assert len(read_jsonl(outs[1] / "manifest.jsonl")) == 1


def test_malformed_yaml_is_one_line(tmp_path: Path):
    """A config file that is not YAML, and an override value that is not YAML: one line each, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\nseed: 1\n")
    for args in (["train", "--config", str(bad)], ["train", "--config", "configs/train_tiny.yaml", "name=[x"]):
        proc = subprocess.run([sys.executable, str(ROOT / "train_scripts.py"), *args], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and ("bad.yaml" in lines[0] or "name=[x" in lines[0]), proc.stderr


def test_overrides_after_nproc_are_accepted():
    """`--nproc 2 key=value` (overrides after an option with a value) parses; a stray word is still an error."""
    import train_scripts

    parser = train_scripts._parser()
    args, extra = parser.parse_known_args(["train", "--config", str(TRAIN_TINY), "--nproc", "2", "seed=3"])
    assert args.nproc == 2 and list(args.overrides) + extra == ["seed=3"]
    try:
        rc = train_scripts.main(["train", "--config", str(TRAIN_TINY), "--nproc", "2", "oops"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
