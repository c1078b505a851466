"""The training pair reader: original layout without a manifest, ours with one, references, split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.pairs import EditPairsDataset, split
from utils.errors import ConfigError

R = 24


def _img(path: Path, seed: int, size: int = R) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)).save(path)


def _label(i: int) -> list[float]:
    return [float(i) + k / 100 for k in range(25)]


@pytest.fixture()
def original_layout(tmp_path: Path) -> Path:
    """The released 3DPE layout: <dir>/<file>.png, <dir>_<style>/<file>.png, dataset.json, no manifest."""
    root = tmp_path / "train"
    labels = []
    n = 0
    for d in ("00000", "00001"):
        for f in ("img00000000", "img00000001", "img00000002"):
            rel = f"{d}/{f}.png"
            _img(root / rel, n)
            labels.append([rel, _label(n)])
            n += 1
    for d in ("00000", "00001"):
        for f in ("img00000000", "img00000001", "img00000002"):
            _img(root / f"{d}_pixar" / f"{f}.png", 100 + n)
            n += 1
    # golden-statue exists for one portrait only: its reference must be the target itself.
    _img(root / "00001_golden-statue" / "img00000002.png", 999)
    # An input without any edit, and a stray top-level image: neither makes a pair.
    _img(root / "00002" / "img00000000.png", 7)
    labels.append(["00002/img00000000.png", _label(50)])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def test_original_layout_without_manifest(original_layout: Path) -> None:
    ds = EditPairsDataset(original_layout, resolution=R)
    assert not ds.uses_manifest
    assert len(ds) == 7
    assert ds.edit_types == ["golden-statue", "pixar"]
    labels = dict(json.loads((original_layout / "dataset.json").read_text())["labels"])
    for i in range(len(ds)):
        item = ds[i]
        for key in ("input", "target", "reference"):
            x = item[key]
            assert x.shape == (3, R, R) and x.dtype == torch.float32
            assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert item["camera"].dtype == torch.float32 and item["camera"].shape == (25,)
        assert torch.allclose(item["camera"], torch.tensor(labels[item["input_path"]]))
        d, f = item["input_path"].split("/")
        assert item["target_path"] == f"{d}_{item['edit_type']}/{f}"
        assert isinstance(item["instruction"], str) and item["instruction"]
        # the target is the edited file, not the input
        assert not torch.equal(item["input"], item["target"])


def test_reference_is_another_portrait(original_layout: Path) -> None:
    ds = EditPairsDataset(original_layout, resolution=R)
    refs_seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            ref_input = ds.pairs[ds.reference_index(i)].input
            if item["edit_type"] == "pixar":
                assert item["reference_path"].startswith(("00000_pixar/", "00001_pixar/"))
                assert ref_input != item["input_path"], "a target was paired with itself as reference"
                assert item["reference_path"] != item["target_path"]
                refs_seen.add((i, item["reference_path"]))
            else:  # the only golden-statue edit: the target itself is the only choice
                assert item["reference_path"] == item["target_path"]
                assert torch.equal(item["reference"], item["target"])
    assert len({r for _, r in refs_seen}) > 3  # draws vary with the epoch
    # deterministic given (seed, epoch, index)
    ds.set_epoch(3)
    a = [ds[i]["reference_path"] for i in range(len(ds))]
    ds2 = EditPairsDataset(original_layout, resolution=R)
    ds2.set_epoch(3)
    assert a == [ds2[i]["reference_path"] for i in range(len(ds2))]


def test_instructions_from_vocabulary_or_style_name(original_layout: Path) -> None:
    from datasets.layout import load_vocabulary

    vocab = load_vocabulary(Path(__file__).resolve().parents[2] / "configs" / "edit_vocabulary.yaml")
    ds = EditPairsDataset(original_layout, resolution=R)
    for i in range(len(ds)):
        assert ds[i]["instruction"] in vocab[ds.pairs[i].edit_type].instructions
    bare = EditPairsDataset(original_layout, resolution=R, vocabulary=None)
    assert {bare[i]["instruction"] for i in range(len(bare))} == {"pixar", "golden statue"}


def test_resize_and_filter_edit_types(original_layout: Path) -> None:
    ds = EditPairsDataset(original_layout, resolution=16, edit_types=["pixar"])
    assert len(ds) == 6 and ds[0]["input"].shape == (3, 16, 16)


def test_manifest_any_file_names(tmp_path: Path) -> None:
    """With a manifest, names need not follow the original rules ('_' allowed, any folders)."""
    root = tmp_path / "ours"
    records, labels = [], []
    for i in range(3):
        inp, out = f"portraits/person_{i}.png", f"edited/zombie_look/person_{i}_edited.png"
        _img(root / inp, i)
        _img(root / out, 10 + i)
        labels.append([inp, _label(i)])
        records.append({"input": inp, "output": out, "edit_type": "zombie", "instruction": f"zombify {i}",
                        "kept": True, "variant": 0})
        records.append({"input": inp, "output": None, "edit_type": "zombie", "instruction": "x",
                        "kept": False, "variant": 1})
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = EditPairsDataset(root, resolution=R)
    assert ds.uses_manifest and len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["instruction"] == f"zombify {item['input_path'][-5]}"
        assert item["target_path"].startswith("edited/zombie_look/")
        assert item["reference_path"] != item["target_path"]
    # the same folder read by the original rules finds no pairs (the names break them)
    with pytest.raises(ConfigError):
        EditPairsDataset(tmp_path / "missing")
    assert len(EditPairsDataset(root, manifest=False, resolution=R)) == 0


def test_missing_label_is_an_error(original_layout: Path) -> None:
    data = json.loads((original_layout / "dataset.json").read_text())
    data["labels"] = [e for e in data["labels"] if e[0] != "00000/img00000001.png"]
    (original_layout / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="no label"):
        EditPairsDataset(original_layout)
    with pytest.raises(ConfigError, match="manifest"):
        EditPairsDataset(original_layout, manifest=True)


def test_split_by_portrait(original_layout: Path) -> None:
    ds = EditPairsDataset(original_layout, resolution=R)
    train, val = split(ds, val_fraction=0.34, seed=1)
    assert set(train.portraits).isdisjoint(val.portraits)
    assert set(train.portraits) | set(val.portraits) == set(ds.portraits)
    assert len(train) + len(val) == len(ds)
    assert len(val.portraits) == 2
    for part in (train, val):  # references are drawn within each part
        for i in range(len(part)):
            assert part[i]["reference_path"] in {p.target for p in part.pairs}
    again, _ = split(ds, val_fraction=0.34, seed=1)
    assert again.portraits == train.portraits
