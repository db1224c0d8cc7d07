"""Layers point one way: the sampling and search library (s3search/, predictors/) imports neither the service's
storage (studies) nor its HTTP layer (api); studies never imports api. The CLI (s3search/cli) sits on top of
everything and is the one exception."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> packages it must never import
FORBIDDEN = {"s3search": ("studies", "api"), "predictors": ("studies", "api"), "studies": ("api",)}
ON_TOP = ("s3search/cli",)


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in the file, function-level imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def offending_imports(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(top + "/") for top in ON_TOP):
            continue
        bad = imported_packages(path) & set(FORBIDDEN[package])
        found += [f"{rel} imports {name}" for name in sorted(bad)]
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    assert not offending_imports(package)


def test_the_check_sees_an_offending_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from studies.jobs import create_job\n    import api.app\n")
    assert imported_packages(bad) >= {"studies", "api"}
