"""Imports run one way: entry points → tools → training → pipelines → models | datasets → utils.

Every `import` and `from … import` in every product file is checked, including those inside functions
(the layout is described in docs/architecture.md). A module may import its own package and any package of a
lower layer; packages of the same layer do not import each other (models and datasets are independent).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: top-level name → layer (higher layers may import lower ones)
LAYERS: dict[str, int] = {
    "utils": 0,
    "models": 1,
    "datasets": 1,
    "pipelines": 2,
    "training": 3,
    "tools": 4,
    "test_scripts": 5,
    "train_scripts": 5,
    "benchmarks": 6,
    "experiments": 6,
}

#: Old `python -m` spellings kept working: each only forwards to the module named here.
FORWARDERS: dict[str, str] = {
    "utils/evaluate.py": "tools.evaluate",
    "utils/demo.py": "tools.demo",
    "utils/edit_video.py": "tools.edit_video",
    "utils/preprocess.py": "tools.preprocess",
    "utils/convert_checkpoint.py": "tools.convert_checkpoint",
    "datasets/datagen.py": "tools.datagen",
    "datasets/eg3d_samples.py": "tools.eg3d_samples",
}


def product_files() -> list[Path]:
    skip = {"tests", ".git", ".ci", "test_imgs", "pretrained_models", "docs", "configs"}
    out = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in skip or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(p)
    return out


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any nesting depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path.relative_to(ROOT)).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else _module_name(path.relative_to(ROOT))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # `from pkg import module` names a module of pkg: check it as such
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if mod in LAYERS]
    return out


def violations() -> list[str]:
    bad = []
    for path in product_files():
        rel = path.relative_to(ROOT)
        if rel.as_posix() in FORWARDERS:
            continue
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own not in LAYERS:
            bad.append(f"{rel}: top-level '{own}' has no layer (add it to LAYERS and docs/architecture.md)")
            continue
        for line, mod in imported_modules(path):
            top = mod.split(".")[0]
            if top not in LAYERS or top == own:
                continue
            if LAYERS[top] >= LAYERS[own]:
                bad.append(f"{rel}:{line}: {own} (layer {LAYERS[own]}) imports {mod} (layer {LAYERS[top]})")
    return bad


def test_imports_run_one_way():
    bad = violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel,target", sorted(FORWARDERS.items()))
def test_forwarders_are_thin(rel: str, target: str):
    """An old `python -m` spelling only forwards: it imports its target and nothing else of the project."""
    path = ROOT / rel
    assert path.is_file(), f"{rel} is listed as a forwarder but does not exist"
    mods = {m.split(".")[0] for _, m in imported_modules(path)} & set(LAYERS)
    assert mods <= {target.split(".")[0]}, f"{rel} imports {mods}"
    assert target in {m for _, m in imported_modules(path)}, f"{rel} does not forward to {target}"
    code = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) <= 15, f"{rel} is not a thin forwarder ({len(code)} lines)"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path, monkeypatch):
    """The walk must catch an upward import hidden in a function body (the check can fail)."""
    pkg = tmp_path / "utils"
    pkg.mkdir()
    (pkg / "leaf.py").write_text("def f():\n    from pipelines.editor import PortraitEditor\n    return PortraitEditor\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert any("utils/leaf.py:2" in v and "pipelines.editor" in v for v in violations())
