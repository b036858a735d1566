"""No import cycle between the modules of ``pipeline/``, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = "pipeline"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root / PACKAGE`` (a package is its ``__init__``)."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The ``pipeline`` modules that ``module`` imports anywhere in its file (top level, functions, classes)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # ``from pipeline import config`` imports the module pipeline.config
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_files(root)
    return {module: imported_modules(module, path, set(files)) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, modules in name order)."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node) :], node]
        if node in done:
            return None
        stack.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def test_pipeline_has_no_import_cycle() -> None:
    graph = import_graph(ROOT)
    assert {"pipeline.registry", "pipeline.serving", "pipeline.use"} <= graph.keys()
    assert "pipeline.use" in graph["pipeline.cli"]  # imported inside a function: in the graph too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    (tmp_path / PACKAGE / "sub").mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "sub" / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "a.py").write_text("from pipeline.sub import b\n")
    (tmp_path / PACKAGE / "sub" / "b.py").write_text("from . import c\n")
    (tmp_path / PACKAGE / "sub" / "c.py").write_text("import os\n\n\ndef f():\n    from pipeline import a\n")
    graph = import_graph(tmp_path)
    assert graph["pipeline.a"] == {"pipeline.sub.b"} and graph["pipeline.sub.b"] == {"pipeline.sub.c"}
    assert find_cycle(graph) == ["pipeline.a", "pipeline.sub.b", "pipeline.sub.c", "pipeline.a"]
    (tmp_path / PACKAGE / "sub" / "c.py").write_text("import pipeline.sub\n")
    assert find_cycle(import_graph(tmp_path)) is None
