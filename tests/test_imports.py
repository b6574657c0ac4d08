"""The import graph: folders are the layers and import downward only (LAYERS), so every module
imports on its own and no module needs a function-level import to break a cycle."""
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
# The layers, lowest first: a module imports (at module level or inside a function) from its own
# layer or a lower one only; a piece two layers use lives in the lower one. Each folder is one
# layer; a top-level module is placed on its own. Base: what every layer may use. The package
# root re-exports the model API (and holds __version__), so it sits with the models.
LAYERS = [
    ("base", {"mobileinst.errors", "mobileinst.utils", "mobileinst.dist", "mobileinst.viz"}),
    ("models", {"mobileinst", "mobileinst.models", "mobileinst.checkpoint"}),
    ("data", {"mobileinst.data"}),
    ("infer", {"mobileinst.infer"}),
    ("evaluate", {"mobileinst.evaluate"}),
    ("train", {"mobileinst.train"}),
    ("jobs", {"mobileinst.track", "mobileinst.export", "mobileinst.verb_config"}),
    ("verbs", {"mobileinst.predict", "mobileinst.demo", "mobileinst.benchmark", "mobileinst.serve",
               "mobileinst.profile"}),
    ("cli", {"mobileinst.cli"}),
]


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "mobileinst."))


def source(name: str) -> tuple[Path, bool]:
    """The file of module `name` and whether it is a package."""
    path = ROOT.joinpath(*name.split(".")[1:])
    return (path / "__init__.py", True) if path.is_dir() else (path.with_suffix(".py"), False)


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
        file, is_package = source(name)
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
        for fn in ast.walk(ast.parse(source(name)[0].read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and name not in LAZY_OK:
                found += [f"{name}:{n.lineno}" for n in ast.walk(fn)
                          if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("mobileinst"))]
    assert not found, found


def layer(module: str) -> int | None:
    """Index in LAYERS of `module` (the root exactly, any other module by its top-level name)."""
    top = module if module == "mobileinst" else ".".join(module.split(".")[:2])
    return next((i for i, (_, members) in enumerate(LAYERS) if top in members), None)


def is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` - what runs when the file is the program, never on import."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def all_imports(name: str) -> list[str]:
    """Every mobileinst module `name` imports, at module level or inside a function."""
    file, is_package = source(name)
    body = [n for n in ast.parse(file.read_text()).body if not is_main_block(n)]
    found = []
    for node in (n for top in body for n in ast.walk(top)):
        if isinstance(node, ast.ImportFrom):
            found += resolve(name, node, is_package)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "mobileinst"]
    return found


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() + ["mobileinst"] if layer(name) is None]
    assert not unplaced, f"place these in LAYERS (tests/test_imports.py): {unplaced}"


def test_imports_go_to_the_same_or_a_lower_layer():
    up = set()
    for name in modules() + ["mobileinst"]:
        for target in all_imports(name):
            a, b = layer(name), layer(target)
            if a is not None and b is not None and b > a:
                up.add(f"{source(name)[0].relative_to(ROOT.parent)} (layer {LAYERS[a][0]}) imports "
                       f"{target} (layer {LAYERS[b][0]})")
    assert not up, "imports that point up:\n" + "\n".join(sorted(up))


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
