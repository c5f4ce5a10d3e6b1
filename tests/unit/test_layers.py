"""The layout's rules, read from the code's own imports: each layer imports only what lies below it, one module reads
the environment, and no module or function outgrows a page."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parents[2] / "serve"
FLASK = ("flask", "werkzeug", "gunicorn")

# Each package, and what it must never import (a name or any module below it).
FORBIDDEN = {
    "engine": (
        "serve.http",
        "serve.front",
        "serve.sagemaker",
        "serve.loading",
        "serve.modeling",
        "serve.app",
        "serve.wiring",
        "serve.config",
        "serve.errors",
        *FLASK,
    ),
    "front": ("serve.http", "serve.sagemaker", "serve.app", "serve.wiring", "serve.loading", *FLASK),
    "loading": ("serve.http", "serve.front", "serve.sagemaker", "serve.app", *FLASK),
    "modeling": ("serve.http", "serve.front", "serve.sagemaker", "serve.app", "serve.loading", *FLASK),
    "http": ("serve.app", "serve.wiring", "serve.loading", "serve.modeling"),
}


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _runtime_imports(tree: ast.AST) -> set[str]:
    """Modules imported outside ``if TYPE_CHECKING:`` blocks."""
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _breaks(imported: str, forbidden: tuple[str, ...]) -> bool:
    return any(imported == name or imported.startswith(name + ".") for name in forbidden)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below_it(package):
    wrong = {
        f"{source.relative_to(SERVE.parent)}: {name}"
        for source in _sources(SERVE / package)
        for name in _runtime_imports(ast.parse(source.read_text()))
        if _breaks(name, FORBIDDEN[package])
    }
    assert not wrong


def test_the_rule_catches_an_upward_import():
    tree = ast.parse("from serve.http.routes import common\nimport flask\n")
    assert {name for name in _runtime_imports(tree) if _breaks(name, FORBIDDEN["front"])} == {
        "serve.http.routes",
        "serve.http.routes.common",
        "flask",
    }
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from serve.http import app\n")
    assert not any(_breaks(name, FORBIDDEN["front"]) for name in _runtime_imports(guarded))


def _reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(alias.name in ("environ", "getenv") for alias in node.names):
                return True
    return False


def test_only_the_settings_module_reads_the_environment():
    readers = {
        str(source.relative_to(SERVE.parent))
        for source in _sources(SERVE)
        if _reads_environment(ast.parse(source.read_text()))
    }
    assert readers == {"serve/config/__init__.py"}


def test_at_most_eight_modules_at_the_top_of_the_package():
    assert len(list(SERVE.glob("*.py"))) <= 8


@pytest.mark.parametrize("source", _sources(SERVE) + _sources(SERVE.parent / "deploy"), ids=str)
def test_no_module_over_400_lines_and_no_function_over_50(source):
    text = source.read_text()
    assert len(text.splitlines()) <= 400
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50
    ]
    assert not long
