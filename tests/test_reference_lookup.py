"""The reference fixtures (tests/conftest.py): one lookup; skip when absent, fail under CI=true, env override."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT

PROBE = '''
def test_encoder(encoder_parity_outputs):
    assert set(encoder_parity_outputs) == {"LT"}


def test_reference(reference_dir):
    assert reference_dir.is_dir()
'''


def run_probe(tmp_path: Path, **env: str) -> str:
    """Run PROBE with tests/conftest.py as a plugin; return pytest's summary line."""
    (tmp_path / "probe_test.py").write_text(PROBE)
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "THREEDPE_ENCODER_PARITY")}
    full_env.update(env, PYTHONPATH=str(ROOT / "tests"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(tmp_path / "probe_test.py")],
                       cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)
    return r.stdout.strip().splitlines()[-1]


def test_absent_fixtures_skip_locally_and_fail_under_ci(tmp_path):
    absent = str(tmp_path / "nonexistent")
    assert "2 skipped" in run_probe(tmp_path, THREEDPE_REFERENCE=absent)
    summary = run_probe(tmp_path, THREEDPE_REFERENCE=absent, CI="true")
    assert "skipped" not in summary and "2 error" in summary


def test_encoder_fixture_env_override(tmp_path):
    torch.save({"LT": torch.zeros(1)}, tmp_path / "mine.pt")
    (tmp_path / "ref").mkdir()
    summary = run_probe(tmp_path, THREEDPE_REFERENCE=str(tmp_path / "ref"), CI="true",
                        THREEDPE_ENCODER_PARITY=str(tmp_path / "mine.pt"))
    assert "2 passed" in summary
