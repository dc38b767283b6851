"""Packages point one way (README "Layout"): every import of every module, at the top or inside a function, stays
within what its package may use. A model that imported the FP8 package, or a parallel layer that imported the
trainer, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "configs": set(),
    "model": {"core", "configs"},
    "optim": {"core", "model"},
    "fp8": {"core", "model"},
    "data": {"core"},
    "parallel": {"core", "model", "optim", "fp8"},
    "trainer": {"core", "configs", "model", "optim", "fp8", "data", "parallel"},
    "launch": {"core", "configs", "model", "optim", "fp8", "data", "parallel", "trainer"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(ALLOWED) | ({"bench", "tests"} & out)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(ROOT)): sorted(_imports(f) - ALLOWED[package] - {package}) for f in files}
    assert not {f: w for f, w in wrong.items() if w}
