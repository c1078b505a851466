"""benchmarks/run_all.py: results go to an untracked folder; docs/benchmarks.md and benchmarks/results/ change
only with --update-docs (the benchmarks themselves are replaced by a stub writing a small JSON)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402

FAKE = {"machine": {"cpu": "test-cpu", "device": "cpu"}, "median_ms": 12.5, "runs_ms": [12.0, 13.0]}


def _tree_digest(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture()
def stub_benchmarks(monkeypatch) -> list[str]:
    ran: list[str] = []

    def run_benchmark(name, out_json, device, extra):
        ran.append(name)
        Path(out_json).write_text(json.dumps({**FAKE, "name": name}))
        return name != "video"  # one benchmark fails

    monkeypatch.setattr(run_all, "run_benchmark", run_benchmark)
    monkeypatch.setattr(run_all, "machine_tag", lambda device: "cpu")
    return ran


def test_default_run_leaves_the_tracked_files_alone(tmp_path, capsys, stub_benchmarks):
    tracked = _tree_digest(ROOT / "docs" / "benchmarks.md", ROOT / "benchmarks" / "results")
    out = tmp_path / "out"
    assert run_all.main(["--only", "render", "train", "--out", str(out)]) == 0
    assert stub_benchmarks == ["render", "train"]
    assert _tree_digest(ROOT / "docs" / "benchmarks.md", ROOT / "benchmarks" / "results") == tracked
    assert sorted(p.name for p in out.iterdir()) == ["render.json", "summary.md", "train.json"]
    summary = (out / "summary.md").read_text()
    assert "### render" in summary and "| median_ms | 12.5 |" in summary
    lines = capsys.readouterr().out.splitlines()
    assert f"results: {out}/ (render.json, train.json, summary.md)" in lines
    assert "docs/benchmarks.md and benchmarks/results/ not changed (pass --update-docs to record these results)" \
        in lines


def test_default_out_is_an_ignored_folder():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/runs/" in ignored  # the default --out, runs/benchmarks/<machine>/, is not tracked


def test_update_docs_records_the_results_and_keeps_the_narrative(tmp_path, capsys, monkeypatch, stub_benchmarks):
    record, doc = tmp_path / "record", tmp_path / "benchmarks.md"
    (record / "cuda-X").mkdir(parents=True)
    (record / "cuda-X" / "render.json").write_text(json.dumps({**FAKE, "median_ms": 1.5}))  # another machine's
    doc.write_text(f"# Benchmarks\n\nnarrative\n\n{run_all.MARKER}\n\nold figures\n")
    monkeypatch.setattr(run_all, "RECORD", record)
    rc = run_all.main(["--only", "render", "video", "--out", str(tmp_path / "out"), "--update-docs", "--doc", str(doc)])
    assert rc == 1  # video failed: reported, the rest still recorded
    assert sorted(p.name for p in (record / "cpu").iterdir()) == ["render.json"]
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nnarrative\n\n" + run_all.MARKER) and "old figures" not in text
    assert "### render (cpu)" in text and "### render (cuda-X)" in text and "| median_ms | 1.5 |" in text
    out = capsys.readouterr().out.splitlines()
    assert f"updated: {doc} (raw figures) and {record / 'cpu'}/" in out
    assert "failed: video (their output is above)" in out
