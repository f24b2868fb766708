"""Imports point one way: bench → assistant → convert → models. A package never imports one above it, so
models/ can be read (and reused) without the app, and the app's edges never leak into the network code.
bench/ and tests/ sit on top: nothing imports them (bench/ uses tests/'s synthetic checkpoint writer)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LAYERS = ["models", "convert", "assistant"]                       # lowest first
TOP_LEVEL = {*LAYERS, "bench", "tests"}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file, wherever it is (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(layer: str) -> list[str]:
    above = TOP_LEVEL - set(LAYERS[:LAYERS.index(layer) + 1])
    return [f"{path.relative_to(REPO_ROOT)}:{line} imports {package}"
            for path in sorted((REPO_ROOT / layer).rglob("*.py"))
            for line, package in imported_packages(path) if package in above]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_package_imports_one_above_it(layer: str) -> None:
    assert upward_imports(layer) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "upward.py"
    module.write_text("def later():\n    from assistant.chat import engine\n\nimport convert.pipeline\n")
    assert sorted(imported_packages(module)) == [(2, "assistant"), (4, "convert")]
