"""The shape of the package: no import cycles inside ``threadsync``, the kernel never
imports a plugin or the CLI, and every module says what it is for.

Imports are read from the source with :mod:`ast`, at every level of a module
(inside functions and ``if TYPE_CHECKING:`` blocks too), so a cycle cannot hide
behind a late import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folders of the package and the import name each one has.
TREES = {"core": "threadsync.core", "plugins": "threadsync.plugins"}


def package_modules() -> dict[str, Path]:
    """Every module of the package by its import name."""
    found = {"threadsync": ROOT / "__init__.py"}
    for path in sorted(ROOT.glob("*.py")):  # cli.py and its helpers
        if path.name != "__init__.py":
            found[f"threadsync.{path.stem}"] = path
    for folder, prefix in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            if "versions" in rel.parts:  # Alembic revision files are data
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if name.startswith("threadsync.core.testing"):
                name = name.replace("threadsync.core.testing", "threadsync.testing", 1)
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package modules that ``name`` imports, resolved to module names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # ``from pkg import submodule`` depends on the submodule; ``from mod
            # import name`` on the module. Parent packages are imported on the way
            # to any submodule and are not counted as edges.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: set(imports_of(name, path, known)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


# The package facade (``threadsync/__init__.py``) imports nothing at import time;
# its lazy names are strings. Edges into it would be cycles with every module.
def test_no_import_cycles_in_the_package() -> None:
    graph = import_graph()
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_kernel_imports_no_plugin_and_not_the_cli() -> None:
    graph = import_graph()
    offenders = {
        name: sorted(
            t for t in targets if t.startswith(("threadsync.plugins", "threadsync.cli"))
        )
        for name, targets in graph.items()
        if name.startswith(("threadsync.core", "threadsync.testing"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_every_module_says_what_it_is_for(name: str) -> None:
    path = package_modules()[name]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 8, f"{path.relative_to(ROOT)} needs a docstring"


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (the tree is mapped onto the import
    name ``threadsync``); a new folder that is not listed would be missing from the
    installed wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ])
    folders = {
        name
        for name, path in package_modules().items()
        if path.name == "__init__.py" or name == "threadsync"
    }
    assert folders == listed
