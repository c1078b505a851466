"""benchmarks/gpu_check.py (issue #24): the CPU dry run (`--device cpu --tiny`) runs every part end to end; a check
that raises is recorded as failed and the run goes on; a spent budget skips; usage errors are one line, exit 2."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

HEADER = "| part | check | measured | limit / target | result |"


def read(out) -> tuple[dict, str]:
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    return (rc, *read(out))


def test_dry_run_passes_every_section(dry_run):
    rc, rep, md = dry_run
    assert rc == 0 and rep["passed"] and rep["failed"] == [] and rep["complete"], rep["failed"]
    results = rep["results"]
    assert list(results) == list(gpu_check.PARTS)
    for name in ("editor_triplane", "editor_views", "training_step"):
        assert results["correctness"][name]["pass"] is True, results["correctness"][name]
    assert results["correctness"]["editor_triplane"]["limit"] == gpu_check.TRIPLANE_TOL
    assert results["correctness"]["editor_views"]["limit"] == pytest.approx(1 / 255)
    assert results["correctness"]["training_step_recipe"]["status"] == "skipped"   # full size only

    speed = results["speed"]
    assert set(speed) == {"edit_1view_fp32", "edit_1view_bf16", "batch2_fp32", "batch2_bf16",
                          "train_step_b2_fp32", "train_step_b2_bf16"}
    for rec in speed.values():
        assert rec["status"] == "measured" and rec["median_ms"] > 0 and len(rec["runs_ms"]) == 3, rec
    assert speed["edit_1view_bf16"]["target_ms"] == 20 and speed["edit_1view_fp32"]["target_ms"] == 40
    assert isinstance(speed["edit_1view_bf16"]["met"], bool)
    assert speed["train_step_b2_bf16"]["peak_memory_mib"] > 0 and speed["batch2_fp32"]["images_per_s"] > 0

    ddp = results["ddp"]
    assert ddp["torchrun"]["pass"] and ddp["torchrun"]["checkpoint_step"] == 2
    assert ddp["resume"]["pass"] and ddp["resume"]["started_at"] == 2 and ddp["resume"]["checkpoint_step"] == 3
    assert ddp["collective"]["pass"] and ddp["collective"]["backend"] == "gloo"

    comp = results["compile"]["edit_1view_bf16_compiled"]
    assert comp["status"] == "measured" and comp["mode"] is None and comp["max_abs_diff_vs_eager"] == 0.0
    assert comp["compile_seconds"] >= 0 and comp["eager_median_ms"] > 0 and isinstance(comp["met"], bool)

    assert rep["machine"]["device"] == "cpu" and rep["machine"]["torch"] == torch.__version__
    assert HEADER in md and f"torch {torch.__version__}" in md
    assert "| editor_triplane | max Δ / max ref 0 | ≤ 0.0001 | pass |" in md
    assert "| edit_1view_bf16 |" in md and "≤ 20 ms" in md and "| resume |" in md
    assert "Result: no check failed (1 skipped)." in md


def test_a_check_that_raises_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken_editor(*args, **kwargs):
        raise RuntimeError("editor down\nsecond line")

    def broken_part(ctx):
        raise ValueError("part down")

    monkeypatch.setattr(gpu_check, "editor_outputs", broken_editor)
    monkeypatch.setattr(gpu_check, "part_speed", broken_part)
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--parts", "correctness", "speed"])
    rep, md = read(tmp_path)
    assert rc == 1 and not rep["passed"]
    corr = rep["results"]["correctness"]
    assert corr["editor_triplane"] == {**corr["editor_triplane"], "status": "fail", "pass": False,
                                       "error": "RuntimeError: editor down"}
    assert corr["editor_views"]["status"] == "fail"
    assert corr["training_step"]["pass"] is True          # the next check ran
    assert rep["results"]["speed"]["part"]["error"] == "ValueError: part down"
    assert rep["failed"] == ["correctness/editor_triplane", "correctness/editor_views", "speed/part"]
    assert "fail: RuntimeError: editor down" in md and "Result: FAILED: correctness/editor_triplane" in md


def test_spent_budget_skips_every_check(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--time-limit", "0"])
    rep, md = read(tmp_path)
    assert rc == 0
    records = [r for checks in rep["results"].values() for r in checks.values() if r["status"] != "note"]
    assert len(records) == 14 and all(r == {**r, "status": "skipped", "reason": "time"} for r in records)
    assert md.count("skipped: time") == 14


def test_a_killed_run_keeps_the_parts_it_finished(tmp_path, monkeypatch):
    """The report is written after every part: a run stopped in a later part keeps the earlier records."""
    def killed(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "part_ddp", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--time-limit", "0"])
    rep, md = read(tmp_path)
    assert not rep["complete"] and list(rep["results"]) == ["correctness", "speed"]
    assert "so far (the run did not finish)" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_is_one_error_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: this machine has no CUDA device; run it on a GPU machine, "
                   "or `--device cpu --tiny` for a dry run"]
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    target = tmp_path / "report.json"
    target.write_text("{}")
    assert gpu_check.main(["--device", "cpu", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {target} is a file")
    assert target.read_text() == "{}"
