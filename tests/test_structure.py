"""The package's shape: a tree of modules, not a web (docs/design.md), and units that fit on a screen.

These read the source with `ast`; nothing is imported, so they run in milliseconds.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cwt_ray"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _dynamic_target(call: ast.Call) -> str | None:
    """The module an importlib.import_module(...) or __import__(...) call names, '' when it is not
    a literal (which we cannot check), None when the call is not an import."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__"):
        return None
    arg = call.args[0] if call.args else None
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return ""
    package = call.args[1].value if name == "import_module" and len(call.args) > 1 \
        and isinstance(call.args[1], ast.Constant) else None
    return ("cwt_ray" + arg.value) if arg.value.startswith(".") and package == "cwt_ray" else arg.value


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth of the file (function bodies too),
    by `import`, `from ... import` or importlib/__import__ with a literal name."""
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def add(src: str, dotted: str) -> None:
        parts = dotted.split(".")
        if parts[0] == "cwt_ray" and len(parts) > 1 and parts[1] in modules:
            graph[src].add(parts[1])

    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1:
                    base = f"cwt_ray.{base}" if base else "cwt_ray"
                if base == "cwt_ray":   # from . import rundir
                    for alias in node.names:
                        add(name, f"cwt_ray.{alias.name}")
                else:
                    add(name, base)
            elif isinstance(node, ast.Call):
                target = _dynamic_target(node)
                if target == "":
                    raise AssertionError(f"cwt_ray/{name}.py:{node.lineno}: a dynamic import whose module is not a "
                                         "literal string; the import graph cannot be checked")
                if target:
                    add(name, target)
    for m in graph:
        graph[m].discard(m)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_module_graph_has_no_cycle():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_function_level_and_importlib_imports():
    """The checker itself: a cycle hidden in a function body, or behind importlib, is found."""
    hidden = {"a": ast.parse("def f():\n    from .b import x\n"),
              "b": ast.parse("import importlib\ndef g():\n    importlib.import_module('cwt_ray.a')\n")}
    assert find_cycle(import_graph(hidden)) == ["a", "b", "a"]
    dunder = {"a": ast.parse("from cwt_ray import b\n"), "b": ast.parse("def g():\n    __import__('cwt_ray.a')\n")}
    assert find_cycle(import_graph(dunder)) == ["a", "b", "a"]
    with pytest.raises(AssertionError, match="dynamic import"):
        import_graph({"a": ast.parse("import importlib\nname = 'cwt_ray.b'\nimportlib.import_module(name)\n")})
    assert find_cycle(import_graph({"a": ast.parse("from . import b\n"), "b": ast.parse("import json\n")})) is None


def test_bottom_modules_import_no_stage():
    """What every stage shares sits below them: the config, the Ray helpers, the run-directory
    layout and the console import nothing above them (docs/design.md lists the layers)."""
    graph = import_graph(_modules())
    assert graph["config"] == set() and graph["console"] == set() and graph["extract"] == set()
    assert graph["cluster"] <= {"config", "console"} and graph["rundir"] <= {"config"}
    stages = {"data", "chunk", "train", "skip", "eval", "report", "teach"}
    for stage in stages:
        assert not graph[stage] & {"pipeline", "sweep", "sweep_report", "cli"}, stage


def test_no_function_is_longer_than_80_lines():
    long = [f"cwt_ray/{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these into smaller units:\n" + "\n".join(long)
