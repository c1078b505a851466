"""Training-data generation on CPU with a tiny random EG3D, tiny InstructPix2Pix and tiny CLIP.

Covers: the 3DPE layout, labels and manifest; resume after a run killed midway (no duplicates, no
temporaries); two gloo ranks writing disjoint shards; CLIP filtering counted; the reader on the output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import datagen
from datasets.layout import load_vocabulary, read_jsonl
from pipelines.datagen import Components, DatagenConfig, main
from utils.config import load_config, parse_seeds

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "datagen_tiny.yaml"
N_INPUTS, STYLES, VARIANTS = 4, ("golden-statue", "pixar"), 2  # from configs/datagen_tiny.yaml


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _temps(out: Path) -> list[str]:
    return [p.name for p in out.rglob(".*") if p.is_file()]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def comps() -> Components:
    cfg = load_config(DatagenConfig, TINY)
    cpu = torch.device("cpu")
    return Components(datagen.build_generator(cfg.source, cpu), datagen.build_editor(cfg.edit, cpu, False, cfg.batch_size),
                      datagen.build_scorer(cfg.filter, cpu))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, comps):
    out = tmp_path_factory.mktemp("full")
    summary = main(TINY, [f"output_dir={out}", "source.keep_latents=true"], components=comps)
    return out, summary


def test_small_run_layout_labels_manifest(full_run) -> None:
    out, summary = full_run
    units = N_INPUTS * len(STYLES)
    assert summary["done"] == units and summary["filtered"] == 0 and summary["failed"] == 0 and summary["skipped"] == 0
    assert summary["variants"] == units * VARIANTS
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert [k for k, _ in labels] == [f"eg3d/seed{s:07d}.png" for s in range(N_INPUTS)]
    for rel, lab in labels:
        assert "_" not in rel and (out / rel).is_file()
        assert len(lab) == 25
        c2w, k = np.array(lab[:16]).reshape(4, 4), np.array(lab[16:]).reshape(3, 3)
        assert np.allclose(c2w[3], [0, 0, 0, 1]) and abs(np.linalg.norm(c2w[:3, 3]) - 2.7) < 0.6
        assert 3.5 < k[0, 0] < 5.5 and 0.39 < k[0, 2] < 0.61 and k[2, 2] == 1
        for style in STYLES:
            d, f = rel.split("/")
            assert (out / f"{d}_{style}" / f).is_file()
        assert Image.open(out / rel).size == (64, 64)
    # latents kept: re-render a sample from its ws and camera
    lat = np.load(out / "latents" / "eg3d" / "seed0000002.npz")
    assert int(lat["seed"]) == 2 and lat["ws"].ndim == 2 and lat["camera"].shape == (25,)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == units * VARIANTS
    assert len({(r["input"], r["edit_type"], r["variant"]) for r in rows}) == len(rows)
    kept = [r for r in rows if r["kept"]]
    assert len(kept) == units
    assert Counter((r["input"], r["edit_type"]) for r in kept) == Counter({(f"eg3d/seed{s:07d}.png", st): 1
                                                                            for s in range(N_INPUTS) for st in STYLES})
    for r in rows:
        assert {"instruction", "seed", "guidance_scale", "image_guidance_scale", "clip_directional",
                "clip_image", "passed"} <= set(r)
    for (inp, st) in {(r["input"], r["edit_type"]) for r in rows}:  # the kept one has the best directional score
        group = [r for r in rows if (r["input"], r["edit_type"]) == (inp, st)]
        best = max(group, key=lambda r: r["clip_directional"])
        assert best["kept"] and best["output"] == datagen.edit_path(inp, st)
    assert not _temps(out)
    assert json.loads((out / "summary.json").read_text())["done"] == units


def test_killed_run_resumes_without_duplicates(tmp_path, comps, full_run) -> None:
    out = tmp_path / "resume"
    calls = []

    def killer(info):
        calls.append(info)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        main(TINY, [f"output_dir={out}"], components=comps, on_unit_done=killer)
    assert len(read_jsonl(out / "manifest.0.jsonl")) == 3 * VARIANTS
    assert not _temps(out)
    # what a hard kill can leave behind: a torn manifest line and a half-written temporary
    with open(out / "manifest.0.jsonl", "a") as fh:
        fh.write('{"input": "eg3d/seed0000001.png", "edit_ty')
    (out / "eg3d_pixar").mkdir(exist_ok=True)
    (out / "eg3d_pixar" / ".seed0000001.x1y2.tmp.png").write_bytes(b"\x89PNG half")

    summary = main(TINY, [f"output_dir={out}"], components=comps)
    units = N_INPUTS * len(STYLES)
    assert summary["skipped"] == 3 and summary["done"] == units - 3 and summary["failed"] == 0
    assert not _temps(out)
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == units * VARIANTS
    assert len({(r["input"], r["edit_type"], r["variant"]) for r in rows}) == len(rows)
    assert all(json.loads(line) for line in (out / "manifest.0.jsonl").read_text().splitlines())
    full_out, _ = full_run
    assert _files(out) == [f for f in _files(full_out) if not f.startswith("latents/")]
    for rel in _files(full_out):
        if rel.endswith(".png") and not rel.startswith("latents/"):
            # same seeds → same pictures (a batch of 1 instead of 2 may move a value by one step)
            assert np.abs(_png(out / rel) - _png(full_out / rel)).max() <= 2, rel
    # a third run has nothing to do
    again = main(TINY, [f"output_dir={out}"], components=comps)
    assert again["skipped"] == units and again["done"] == 0 and again["variants"] == 0


def test_sigkilled_process_resumes(tmp_path, comps) -> None:
    """A real `kill -9` of the CLI mid-run, then a rerun: every unit exactly once, no temporaries."""
    import signal
    import time

    out = tmp_path / "sigkill"
    seeds = "0-7"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "tools.datagen", "--config", str(TINY), f"output_dir={out}",
                             f"source.seeds={seeds}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(read_jsonl(out / "manifest.0.jsonl")) >= 2 * VARIANTS:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    before = {(r["input"], r["edit_type"]) for r in read_jsonl(out / "manifest.0.jsonl")}
    summary = main(TINY, [f"output_dir={out}", f"source.seeds={seeds}"], components=comps)
    units = 8 * len(STYLES)
    assert summary["skipped"] == len(before) and summary["done"] + summary["skipped"] == units
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == units * VARIANTS
    assert len({(r["input"], r["edit_type"], r["variant"]) for r in rows}) == len(rows)
    assert len(json.loads((out / "dataset.json").read_text())["labels"]) == 8
    assert not _temps(out)
    if not killed:
        pytest.skip("the run finished before it could be killed (resume path still checked)")


def test_filtered_edits_are_counted(tmp_path, comps, full_run) -> None:
    full_out, _ = full_run
    rows = read_jsonl(full_out / "manifest.jsonl")
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["input"], r["edit_type"])
        best[key] = max(best.get(key, -2.0), r["clip_directional"])
    values = sorted(set(best.values()))
    thr = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    expect_filtered = sum(v < thr for v in best.values())
    assert 0 < expect_filtered < len(best)

    out = tmp_path / "filtered"
    summary = main(TINY, [f"output_dir={out}", f"filter.min_directional={thr}"], components=comps)
    assert summary["filtered"] == expect_filtered
    assert summary["done"] == len(best) - expect_filtered
    assert summary["variants_filtered"] == sum(r["clip_directional"] < thr for r in rows)
    merged = read_jsonl(out / "manifest.jsonl")
    assert len(merged) == len(rows)  # filtered variants are logged, not dropped
    for (inp, st), v in best.items():
        assert (out / datagen.edit_path(inp, st)).is_file() == (v >= thr)
        unit = [r for r in merged if (r["input"], r["edit_type"]) == (inp, st)]
        assert {r["unit_status"] for r in unit} == {"kept" if v >= thr else "filtered"}
    assert json.loads((out / "dataset.json").read_text())["labels"]  # every input keeps its label
    # filtered units are finished work: a rerun skips them
    again = main(TINY, [f"output_dir={out}", f"filter.min_directional={thr}"], components=comps)
    assert again["skipped"] == len(best) and again["filtered"] == 0

    # keep-best writes an edit even when every variant fails, flagged in the manifest
    out2 = tmp_path / "keepbest"
    s2 = main(TINY, [f"output_dir={out2}", "filter.min_directional=2", "filter.on_all_filtered=keep-best"],
              components=comps)
    assert s2["done"] == len(best) and s2["variants_filtered"] == len(rows)
    assert all(not r["passed"] for r in read_jsonl(out2 / "manifest.jsonl"))


def test_two_gloo_ranks_write_disjoint_shards(tmp_path, full_run) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tools.datagen", "--config", str(TINY), f"output_dir={out}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shards = [{r["input"] for r in read_jsonl(out / f"manifest.{k}.jsonl")} for k in (0, 1)]
    assert shards[0] and shards[1] and shards[0].isdisjoint(shards[1])
    everything = {f"eg3d/seed{s:07d}.png" for s in range(N_INPUTS)}
    assert shards[0] | shards[1] == everything
    labels = [{r["path"] for r in read_jsonl(out / f"labels.{k}.jsonl")} for k in (0, 1)]
    assert labels == shards
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["done"] == N_INPUTS * len(STYLES)
    assert len(read_jsonl(out / "manifest.jsonl")) == N_INPUTS * len(STYLES) * VARIANTS
    assert {k for k, _ in json.loads((out / "dataset.json").read_text())["labels"]} == everything
    full_out, _ = full_run
    pngs = [f for f in _files(full_out) if f.endswith(".png") and not f.startswith("latents/")]
    assert [f for f in _files(out) if f.endswith(".png")] == pngs
    assert not _temps(out)


def test_reader_reads_generated_dataset(full_run) -> None:
    from datasets.pairs import EditPairsDataset

    out, _ = full_run
    with_manifest = EditPairsDataset(out, resolution=64)
    by_names = EditPairsDataset(out, manifest=False, resolution=64)  # the original naming rules hold
    assert with_manifest.uses_manifest and len(with_manifest) == N_INPUTS * len(STYLES)
    assert [(p.input, p.target) for p in with_manifest.pairs] == [(p.input, p.target) for p in by_names.pairs]
    item = with_manifest[0]
    kept = {(r["input"], r["edit_type"]): r for r in read_jsonl(out / "manifest.jsonl") if r["kept"]}
    assert item["instruction"] == kept[(item["input_path"], item["edit_type"])]["instruction"]
    assert item["reference_path"] != item["target_path"]


def test_photos_source(tmp_path, comps) -> None:
    src = tmp_path / "ffhq"
    labels = []
    for i in range(2):
        rel = f"00000/img_{i:08d}.png"  # '_' in the source name is rewritten to '-'
        (src / "00000").mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.RandomState(i).rand(80, 80, 3) * 255).astype(np.uint8)).save(src / rel)
        labels.append([rel, [float(i)] * 25])
    (src / "dataset.json").write_text(json.dumps({"labels": labels}))
    out = tmp_path / "out"
    s = main(TINY, [f"output_dir={out}", "source.kind=photos", f"source.photos_dir={src}", "source.dir_name=ffhq",
                    "source.resolution=64", "edit.edit_types=[pixar]"], components=comps)
    assert s["done"] == 2
    got = json.loads((out / "dataset.json").read_text())["labels"]
    assert got == [["ffhq/00000-img-00000000.png", [0.0] * 25], ["ffhq/00000-img-00000001.png", [1.0] * 25]]
    assert Image.open(out / "ffhq" / "00000-img-00000001.png").size == (64, 64)
    assert (out / "ffhq_pixar" / "00000-img-00000000.png").is_file()


def test_vocabulary_and_seed_specs() -> None:
    vocab = load_vocabulary(ROOT / "configs" / "edit_vocabulary.yaml")
    assert len(vocab) >= 20
    for name, et in vocab.items():
        assert "_" not in name and len(et.instructions) >= 2 and et.source_caption and et.target_caption
    for must in ("golden-statue", "bronze-bust", "pixar", "oil-painting", "sketch", "zombie", "elf", "old-age",
                 "child", "beard", "glasses"):
        assert must in vocab
    assert parse_seeds("0-3,10,2") == [0, 1, 2, 3, 10]
    items = datagen.enumerate_inputs(load_config(DatagenConfig, TINY, ["source.seeds=0-9"]).source)
    shards = [datagen.shard(items, r, 3) for r in range(3)]
    assert sorted(i.rel for s in shards for i in s) == sorted(i.rel for i in items)
    assert sum(len(s) for s in shards) == len(items)


def test_one_seed_parser_rejects_reversed_ranges() -> None:
    from pipelines import datagen_worker
    from tools import eg3d_samples
    from utils.errors import ConfigError

    assert datagen_worker.parse_seeds is eg3d_samples.parse_seeds  # one parser for both tools
    assert parse_seeds(" 0-2, 7 ,1") == [0, 1, 2, 7] and parse_seeds(5) == [5]
    for bad, says in (("5-3", "'5-3' runs backwards"), ("-3", "'-3' is not a seed"), ("a-b", "'a-b'"),
                      ("", "no seeds")):
        with pytest.raises(ConfigError, match=says):
            parse_seeds(bad, what="source.seeds")
    with pytest.raises(ConfigError, match="source.seeds: the range '5-3'"):
        datagen.enumerate_inputs(load_config(DatagenConfig, TINY, ["source.seeds=5-3"]).source)


def test_rank_without_rendezvous_does_its_shard_and_leaves_the_merge(tmp_path, comps, monkeypatch) -> None:
    """RANK/WORLD_SIZE without MASTER_ADDR (a SLURM array task): no group, this rank's inputs only, no merge."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "array"
    s = main(TINY, [f"output_dir={out}", "edit.edit_types=[pixar]"], components=comps)
    assert s["world_size"] == 2 and s["merged"] is None and s["done"] == N_INPUTS // 2
    assert {r["input"] for r in read_jsonl(out / "manifest.1.jsonl")} == {"eg3d/seed0000001.png", "eg3d/seed0000003.png"}
    assert not (out / "manifest.jsonl").exists() and not (out / "summary.json").exists()
    monkeypatch.setenv("RANK", "0")
    main(TINY, [f"output_dir={out}", "edit.edit_types=[pixar]", "distributed=off"], components=comps)
    assert datagen.merge_outputs(out)["inputs"] == N_INPUTS
