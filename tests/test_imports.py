"""The import graph: layers import downward only, so every module imports on its own and no module
needs a function-level import to break a cycle."""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import mobileinst

ROOT = Path(mobileinst.__file__).parent
# The CLI layer imports the heavy modules inside the functions that need them, so that
# `mobileinst --help` and option errors answer without loading torch; nothing imports these.
LAZY_OK = {"mobileinst.cli", "mobileinst.export.command", "mobileinst.track.command", "mobileinst.benchmark"}


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "mobileinst."))


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """Absolute mobileinst module names a relative/absolute `from ... import ...` refers to."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("mobileinst"):
        return []
    names = [f"{target}.{a.name}" for a in node.names]
    return [n for n in names if n in set(modules())] or [target]


def module_graph() -> dict[str, set[str]]:
    """module -> the mobileinst modules it imports at module level (a package's __init__ counts)."""
    graph = {}
    for name in modules() + ["mobileinst"]:
        path = ROOT.joinpath(*name.split(".")[1:])
        is_package = path.is_dir()
        file = path / "__init__.py" if is_package else path.with_suffix(".py")
        tree = ast.parse(file.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                deps.update(resolve(name, node, is_package))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("mobileinst"))
        graph[name] = {d for d in deps if d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_module_level_import_graph_has_no_cycle():
    assert find_cycle(module_graph()) is None


def test_no_function_level_import_of_our_own_modules_outside_the_cli():
    found = []
    for name in modules():
        path = ROOT.joinpath(*name.split(".")[1:])
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for fn in ast.walk(ast.parse(file.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and name not in LAZY_OK:
                found += [f"{name}:{n.lineno}" for n in ast.walk(fn)
                          if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("mobileinst"))]
    assert not found, found


def test_every_module_imports_alone():
    """Each module imported first, with no other mobileinst module loaded (torch and the other
    third-party packages stay loaded, so one interpreter is enough): an import cycle anywhere
    on its path would fail here."""
    script = f"""
import importlib, json, sys
failed = {{}}
for name in {modules()!r}:
    for m in [m for m in sys.modules if m == "mobileinst" or m.startswith("mobileinst.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        failed[name] = f"{{type(e).__name__}}: {{e}}"
print(json.dumps(failed))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
