"""Imports run one way: entry points → tools → training → pipelines → models | datasets → utils.

Every `import` and `from … import` in every product file is checked, including those inside functions
(the layout is described in docs/architecture.md). A module may import its own package and any package of a
lower layer; packages of the same layer do not import each other (models and datasets are independent).
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
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

#: Modules that moved, with no forwarding module left behind: old name → the one name now. The user commands
#: once lived in the lowest layers (`python -m tools.<name>` is the only spelling); weight I/O is one package.
MOVED: dict[str, str] = {
    "utils.evaluate": "tools.evaluate",
    "utils.demo": "tools.demo",
    "utils.edit_video": "tools.edit_video",
    "utils.preprocess": "tools.preprocess",
    "utils.convert_checkpoint": "tools.convert_checkpoint",
    "datasets.datagen": "tools.datagen",
    "datasets.eg3d_samples": "tools.eg3d_samples",
    "models.hub": "models.checkpoint.hub",
    "models.safe_unpickle": "models.checkpoint.safe_unpickle",
    "models.model_card": "models.checkpoint.model_card",
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


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_moved_modules_have_one_name(old: str, new: str):
    """A moved module is found under its new name only (`python -m utils.evaluate` fails: No module named ...)."""
    assert importlib.util.find_spec(new) is not None, f"{new} is missing"
    assert importlib.util.find_spec(old) is None, f"{old} exists again beside {new}: keep one name"


def test_python_m_of_an_old_spelling_fails():
    """What a user of an old spelling sees: Python's own 'No module named', exit code 1."""
    r = subprocess.run([sys.executable, "-m", "utils.evaluate", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "No module named utils.evaluate" in r.stderr, (r.returncode, r.stderr)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path, monkeypatch):
    """The walk must catch an upward import hidden in a function body (the check can fail)."""
    pkg = tmp_path / "utils"
    pkg.mkdir()
    (pkg / "leaf.py").write_text("def f():\n    from pipelines.editor import PortraitEditor\n    return PortraitEditor\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert any("utils/leaf.py:2" in v and "pipelines.editor" in v for v in violations())
