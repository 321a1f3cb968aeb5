"""Imports go one way (DESIGN.md): `core` imports no other package of the project, and
`data_prep` never imports `models`; no module imports an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train", "infer", "ensemble", "cv_split"}
FORBIDDEN = {
    "core": {"data_prep", "models", "bench", *ENTRY_POINTS},
    "data_prep": {"models", "bench", *ENTRY_POINTS},
    "models": {"bench", *ENTRY_POINTS},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module the file imports, at any depth (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downwards(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from models.registry import build_model\n    import train\n")
    assert imported_packages(module) == {"os", "models", "train"}
