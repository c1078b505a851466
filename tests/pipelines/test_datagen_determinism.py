"""Training-data generation gives the same bytes for any batch size and any number of processes.

docs/data.md promises it: every model call sees one sample (`batch_invariant`, default true) and every
rank runs torch at the configured `threads` (default 1), whatever the launcher set (torchrun sets
OMP_NUM_THREADS=1). The thread count is part of the contract, so both sides here use the same one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.layout import read_jsonl
from pipelines import datagen
from pipelines.datagen import Components, DatagenConfig, main
from utils.config import load_config
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "datagen_tiny.yaml"  # 4 EG3D inputs × 2 styles × 2 variants, 64 px
ONE_STYLE = "edit.edit_types=[pixar]"  # 4 units of 2 variants: enough to see batching, half the time


def _outputs(out: Path) -> dict[str, bytes]:
    """Every image and dataset.json, as file bytes."""
    files = sorted(p for p in out.rglob("*.png")) + [out / "dataset.json"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def _manifest(out: Path) -> list[dict]:
    """The merged manifest without the rank column (which says who did the work, not what came out)."""
    return [{k: v for k, v in r.items() if k != "rank"} for r in read_jsonl(out / "manifest.jsonl")]


@pytest.fixture(scope="module")
def comps() -> Components:
    cfg = load_config(DatagenConfig, TINY)
    cpu = torch.device("cpu")
    return Components(datagen.build_generator(cfg.source, cpu), datagen.build_editor(cfg.edit, cpu, False, 4),
                      datagen.build_scorer(cfg.filter, cpu))


def test_same_bytes_for_batch_1_and_4_and_for_1_and_2_processes(tmp_path, comps) -> None:
    one_b1, one_b4, two_b4 = tmp_path / "1proc-b1", tmp_path / "1proc-b4", tmp_path / "2proc-b4"
    # one process, in this pytest process (whatever its own thread count is)
    for out, bs in ((one_b1, 1), (one_b4, 4)):
        s = main(TINY, [f"output_dir={out}", f"batch_size={bs}", ONE_STYLE], components=comps)
        assert s["done"] == 4 and s["failed"] == 0
    # two gloo ranks under torchrun (threads: 1 on each; shards {0,2} and {1,3}, so batches of 2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tools.datagen", "--config", str(TINY), f"output_dir={two_b4}", "batch_size=4", ONE_STYLE]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((two_b4 / "summary.json").read_text())["world_size"] == 2

    ref = _outputs(one_b1)
    assert len(ref) == 4 + 4 + 1  # inputs, edits, dataset.json
    for other in (one_b4, two_b4):
        got = _outputs(other)
        assert sorted(got) == sorted(ref)
        differ = [name for name in ref if got[name] != ref[name]]
        assert not differ, f"{other.name}: {differ} differ from the batch-1 one-process run"
        assert _manifest(other) == _manifest(one_b1)  # CLIP scores to the last bit, so the same variant is kept


def test_threads_are_set_for_the_run_and_restored(tmp_path, comps) -> None:
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    seen: list[int] = []
    s = main(TINY, [f"output_dir={tmp_path / 'a'}", f"threads={want}", "source.seeds=0", "edit.edit_types=[pixar]"],
             components=comps, on_unit_done=lambda info: seen.append(torch.get_num_threads()))
    assert s["done"] == 1 and seen == [want]
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        main(TINY, [f"output_dir={tmp_path / 'b'}", "threads=-1"], components=comps)


def test_batched_model_calls_still_work(tmp_path, comps) -> None:
    """batch_invariant=false (faster on a GPU, not byte-stable) runs the same units."""
    s = main(TINY, [f"output_dir={tmp_path}", "batch_invariant=false", "batch_size=4"], components=comps)
    assert s["done"] == 8 and s["failed"] == 0
    assert len(read_jsonl(tmp_path / "manifest.jsonl")) == 16
