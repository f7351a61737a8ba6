"""The package's floors stay in order: its imports, read with ast over src/gradwatch, form no cycle.

Three graphs, each checked for cycles (strongly connected components):

- modules, imports at module level only: a cycle here is order-dependent at import time;
- modules, every import (inside functions and ``if TYPE_CHECKING`` too): a cycle closed
  by a lazy import is still two modules that need each other;
- folders: each sub-package (``gradwatch.probes``, ``gradwatch.zoo``, …) and each top-level
  module is one node, every import counted.

A failure names the cycle, each edge with its file line and whether it is at module level.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "gradwatch"
MODULE_LEVEL, IN_FUNCTION, TYPE_ONLY = "module level", "inside a function", "type-checking only"
# The zoo is demo material: the demo and the CLI (``zoo:NAME``) may use it; the core never does.
MAY_IMPORT_ZOO = {"gradwatch.zoo", "gradwatch.demo", "gradwatch.cli"}


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` (both dotted module names), at ``line``, at ``level``."""

    source: str
    target: str
    line: int
    level: str


def modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``src/package`` (a package's name is its __init__.py)."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its level: at module level (class bodies included), in a function, or typing only."""
    out: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, level: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, level))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, IN_FUNCTION if level == MODULE_LEVEL else level)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), TYPE_ONLY if level == MODULE_LEVEL else level)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), level)
            else:
                visit(child, level)

    visit(tree, MODULE_LEVEL)
    return out


def edges(src: Path = SRC, package: str = PACKAGE) -> list[Edge]:
    """The package's imports of its own modules, resolved to the module that runs (``from a import b`` of a
    submodule ``a.b`` is an import of ``a.b``)."""
    known = modules(src, package)
    found: list[Edge] = []
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node, level in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    # the longest prefix that is a module of ours
                    hits = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known]
                    targets += hits[:1]
            else:
                if node.level:  # relative: from the module's own package upwards
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:
                        targets.append(sub)
                    elif base in known:
                        targets.append(base)
            found += [Edge(name, t, node.lineno, level) for t in targets if t != name]
    return found


def folder(module: str) -> str:
    """The node a module belongs to in the folder graph: ``gradwatch.probes.grads`` -> ``gradwatch.probes``."""
    return ".".join(module.split(".")[:2])


def _components(out_edges: dict[str, list[Edge]], nodes: list[str], node) -> list[list[str]]:
    """Strongly connected components (Tarjan 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in out_edges[v]:
            w = node(e.target)
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in nodes:
        if v not in index:
            connect(v)
    return components


def _shortest_cycle(out_edges: dict[str, list[Edge]], members: set[str], start: str, node) -> list[Edge]:
    """Breadth-first from ``start`` back to it, inside one component."""
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for e in out_edges[v]:
            w = node(e.target)
            if w == start:
                return paths[v] + [e]
            if w in members and w not in paths:
                paths[w] = paths[v] + [e]
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")


def cycles(graph_edges: list[Edge], node=lambda m: m) -> list[tuple[list[str], list[Edge]]]:
    """Every cycle that has to be broken: (the nodes of its component, the cycle's edges).

    The shortest cycle through the first node of each strongly connected
    component is reported and its closing hop (all imports between those two
    nodes) set aside; the search repeats until no component is left, so each
    import that closes a cycle is named once.
    """
    out_edges: dict[str, list[Edge]] = defaultdict(list)
    for e in graph_edges:
        if node(e.source) != node(e.target):
            out_edges[node(e.source)].append(e)
    nodes = sorted({node(e.source) for e in graph_edges} | {node(e.target) for e in graph_edges})
    found: list[tuple[list[str], list[Edge]]] = []
    while True:
        components = [sorted(c) for c in _components(out_edges, nodes, node) if len(c) > 1]
        if not components:
            return found
        for members in components:
            cycle = _shortest_cycle(out_edges, set(members), members[0], node)
            found.append((members, cycle))
            last = cycle[-1]
            a, b = node(last.source), node(last.target)
            out_edges[a] = [e for e in out_edges[a] if node(e.target) != b]


def describe(component: tuple[list[str], list[Edge]], node=lambda m: m) -> str:
    members, cycle = component
    hops = [f"{node(e.source)} -> {node(e.target)} ({e.source}:{e.line}, {e.level})" for e in cycle]
    return f"cycle among {', '.join(members)}: " + "; ".join(hops)


def _fail_on(found: list[tuple[list[str], list[Edge]]], node=lambda m: m) -> None:
    if found:
        pytest.fail("\n".join(describe(c, node) for c in found), pytrace=False)


def test_module_level_imports_form_no_cycle():
    _fail_on(cycles([e for e in edges() if e.level == MODULE_LEVEL]))


def test_imports_inside_functions_close_no_cycle_either():
    _fail_on(cycles(edges()))


def test_folders_form_no_cycle():
    _fail_on(cycles(edges(), folder), folder)


def test_core_modules_never_import_the_zoo():
    wrong = [e for e in edges() if folder(e.target) == "gradwatch.zoo" and folder(e.source) not in MAY_IMPORT_ZOO]
    if wrong:
        pytest.fail("\n".join(f"{e.source}:{e.line} imports {e.target} ({e.level})" for e in wrong), pytrace=False)


# --- the walk itself, on a package built for it ----------------------------------------------------------


def test_the_walk_finds_and_names_a_cycle_at_each_level(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from pkg import top\n    return top\n")  # lazy: sub -> top
    (pkg / "top.py").write_text("from pkg.sub import leaf\nfrom . import other\n")  # top -> sub.leaf, top -> other
    (pkg / "other.py").write_text("import os\nfrom typing import TYPE_CHECKING\n"
                                  "if TYPE_CHECKING:\n    import pkg.top\n")
    found = edges(tmp_path, "pkg")
    assert {(e.source, e.target, e.level) for e in found} == {
        ("pkg.sub", "pkg.sub.leaf", MODULE_LEVEL), ("pkg.sub.leaf", "pkg.top", IN_FUNCTION),
        ("pkg.top", "pkg.sub.leaf", MODULE_LEVEL), ("pkg.top", "pkg.other", MODULE_LEVEL),
        ("pkg.other", "pkg.top", TYPE_ONLY)}
    assert cycles([e for e in found if e.level == MODULE_LEVEL]) == []
    first, second = cycles(found)  # two cycles through pkg.top, each named once
    assert describe(first) == ("cycle among pkg.other, pkg.sub.leaf, pkg.top: pkg.other -> pkg.top (pkg.other:4, "
                               "type-checking only); pkg.top -> pkg.other (pkg.top:2, module level)")
    assert describe(second) == ("cycle among pkg.sub.leaf, pkg.top: pkg.sub.leaf -> pkg.top (pkg.sub.leaf:2, "
                                "inside a function); pkg.top -> pkg.sub.leaf (pkg.top:1, module level)")
    by_folder = cycles(found, folder)
    assert [members for members, _ in by_folder] == [["pkg.other", "pkg.sub", "pkg.top"], ["pkg.sub", "pkg.top"]]
