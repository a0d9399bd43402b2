"""The package's import graph: no cycles, and no layer imports a higher one (the order is the README's).

Every `import` and `from ... import` of a deepseekmoe module counts, at module level or inside a function alike,
read from the source with ast (nothing is imported). A unit is a top-level module or package of deepseekmoe/
(`checkpoint`, `model`, `commands`, ...); the README's layout section numbers them, lowest first.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "deepseekmoe"


def _modules() -> dict[str, Path]:
    """'deepseekmoe.model.moe' -> its file, for every module and package of deepseekmoe/."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The deepseekmoe modules one import statement loads (a `from X import name` naming a submodule loads it)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")[: len(module.split(".")) + (1 if is_package else 0) - node.level]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [source + "." + a.name if source + "." + a.name in modules else source for a in node.names]
    return [n for n in names if n == "deepseekmoe" or n.startswith("deepseekmoe.")]


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the deepseekmoe modules it imports (anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, path.name == "__init__.py", node, set(modules)):
                    while target not in modules:  # `import deepseekmoe.x.y` of a name: its module
                        target = target.rsplit(".", 1)[0]
                    edges.add(target)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@functools.cache
def readme_layers() -> dict[str, int]:
    """unit -> layer number, from the README's numbered list `N. `unit` `unit` ...: what they are`."""
    layers = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*(\d+)\. ((?:`[\w.]+` ?)+):", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                layers[name] = int(m.group(1))
    return layers


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "deepseekmoe"


def test_tarjan_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "deepseekmoe.checkpoint" in graph["deepseekmoe.train.state"]  # from ..checkpoint import ...
    assert "deepseekmoe.convert.load" in graph["deepseekmoe.analysis.compare"] or \
        "deepseekmoe.convert.load" in graph["deepseekmoe.analysis.scaling"]  # imported inside a function
    assert "deepseekmoe.inference.generate" in graph["deepseekmoe.commands.train"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_unit_has_a_layer_in_the_readme():
    layers = readme_layers()
    units = {unit(m) for m in import_graph()}
    assert units - set(layers) == set(), "add these to the README's layer list"
    assert set(layers) - units == set(), "the README lists units that do not exist"


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_no_module_imports_a_higher_layer(module):
    layers = readme_layers()
    higher = sorted(t for t in import_graph()[module] if layers[unit(t)] > layers[unit(module)])
    assert higher == [], f"{module} (layer {layers[unit(module)]}) imports higher layers: {higher}"
