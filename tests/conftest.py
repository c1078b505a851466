"""Shared test fixtures: offline mode, few threads, and the reference folder.

The tests mirror the packages (tests/models/eg3d/ tests models/eg3d/, ...); tests of the whole project (layering,
host reads, the compiled path, the reference fixtures, the entry points) and the shared helpers (float64.py,
rounding.py, hf_cache.py, encoder_parity.py, training_parity.py) sit in tests/ itself, on sys.path for every test.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the shared helpers, imported by name from any test folder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def reference_path() -> Path:
    """`$THREEDPE_REFERENCE`, default ../shared/reference (next to the repository)."""
    return Path(os.environ.get("THREEDPE_REFERENCE", str(ROOT.parent / "shared" / "reference")))


def require_reference(path: Path, what: str, variable: str = "THREEDPE_REFERENCE") -> Path:
    """`path` if it exists; otherwise skip the test, or fail it under CI=true (CI must not skip parity)."""
    if not path.exists():
        msg = f"{what} {path} is absent (set {variable})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`$THREEDPE_REFERENCE` (default ../shared/reference); skip if absent, fail under CI=true."""
    return require_reference(reference_path(), "reference folder")


@pytest.fixture(scope="session")
def encoder_parity_outputs() -> dict[str, torch.Tensor]:
    """The original encoders' outputs for tests/encoder_parity.py's weights and inputs (see its docstring).

    Read from `$THREEDPE_ENCODER_PARITY` if set, else `<reference>/fixtures/encoder_parity.pt`; skip if
    absent, fail under CI=true.
    """
    env = os.environ.get("THREEDPE_ENCODER_PARITY")
    path = Path(env) if env else reference_path() / "fixtures" / "encoder_parity.pt"
    require_reference(path, "encoder parity fixture", "THREEDPE_REFERENCE or THREEDPE_ENCODER_PARITY")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    """Key lists copied from the reference into tests/data (facts, safe to ship)."""
    return ROOT / "tests" / "data"


def perturbed_tiny_generator(seed: int):
    """A tiny `TriPlaneGenerator` in eval mode, its random init moved by N(0, 0.01²) noise (so no parameter keeps a
    constant init value a wrong load would also give), from `seed`."""
    from models.eg3d.config import GeneratorConfig
    from models.eg3d.generator import TriPlaneGenerator

    torch.manual_seed(seed)
    g = TriPlaneGenerator(GeneratorConfig.tiny()).eval()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return g


def read_key_list(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Read a `key<TAB>shape<TAB>dtype<TAB>numel` TSV into [(key, shape)]."""
    rows = []
    for line in path.read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        inner = shape.strip("()")
        rows.append((key, tuple(int(s) for s in inner.split(",") if s)))
    return rows


@pytest.fixture
def tiny_original_architectures(monkeypatch):
    """3dpe.pt / Live3D files written from tiny models load as tiny models, also through command lines run
    in-process (`test_scripts.main`, the converter's `main`).

    Only for files that imitate the original release (written without an architecture, e.g.
    `export_original_3dpe(...)` without `configs=`): those record none, and the loader assumes the original's
    (full size); here that assumption becomes the `tiny()` config of the same kind. Files the project writes
    (`write_final`, `export_3dpe_pt`, `export_original_3dpe(..., configs=...)`, project folders) record their
    architecture and need no fixture (tests/models/checkpoint/test_checkpoint_roundtrip.py).
    """
    from models.checkpoint import original

    full_size = original.original_config

    def tiny(model_type: str, component: str, fmt: str, sd):
        cfg = full_size(model_type, component, fmt, sd)
        if component != "encoder":
            return type(cfg).tiny()
        return type(cfg).tiny(cfg.mode if model_type == "live3d" else cfg.prompt_encoder)

    monkeypatch.setattr(original, "original_config", tiny)
