"""No import cycles in `engine` and `gui`, read statically from the source with `ast`.

Every import counts wherever it is written: at module level, inside a function or a class. A function-level import
hides a cycle from Python (it runs after both modules are loaded) but not from a reader, who still has two modules
that each need the other. Imports under `if TYPE_CHECKING:` do not count: they never run and only name types.
Importing `a.b.c` from outside the package `a.b` also runs `a.b`'s __init__ (and `a`'s): those count as imports of
the packages, which is how a package __init__ that imports its submodules closes a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "gui")

Graph = dict[str, set[str]]


def module_names(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name → file, for every module of the packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import under `node`, at any depth, skipping `if TYPE_CHECKING:` bodies (their `else:` still runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif _is_type_checking_block(child):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    # A relative import counts from the importer's package (the module itself when it is a package's __init__).
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imported(path: Path, importer: str, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports; `from x import y` is x.y when that is a module, else x."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        source = _absolute(node, importer, path.name == "__init__.py")
        for alias in node.names:
            found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return _with_packages(found & known, importer, known) - {importer}


def _with_packages(targets: set[str], importer: str, known: set[str]) -> set[str]:
    """The targets and the packages above them whose __init__ the import runs: those the importer is not inside (a
    module inside a package runs only after that package's __init__ has started)."""
    found = set(targets)
    for target in targets:
        parts = target.split(".")
        for depth in range(1, len(parts)):
            package = ".".join(parts[:depth])
            if package in known and importer != package and not importer.startswith(f"{package}."):
                found.add(package)
    return found


def import_graph(root: Path = REPO) -> Graph:
    modules = module_names(root)
    known = set(modules)
    return {name: imported(path, name, known) for name, path in modules.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (a → b → … → a) per strongly connected component that has more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(_cycle_through(graph, set(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _cycle_through(graph: Graph, component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, within the component (breadth first)."""
    start = min(component)
    paths = {target: [start, target] for target in sorted(graph[start] & component)}
    queue = list(paths)
    while queue:
        node = queue.pop(0)
        if node == start:
            return paths[node]
        for target in sorted(graph[node] & component):
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # a component always has one


def test_engine_and_gui_have_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in found)


# --- the checker itself ----------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_function_level_import_cycle_is_found_and_named(tmp_path):
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/a.py": "from engine.b import x\n",
        "engine/b.py": "def x():\n    from engine import a\n",
        "gui/__init__.py": "",
    })
    assert cycles(import_graph(tmp_path)) == [["engine.a", "engine.b", "engine.a"]]


def test_importing_a_submodule_from_outside_runs_its_package_init(tmp_path):
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/config.py": "from engine.models.facts import FACTS\n",
        "engine/models/__init__.py": "from engine.models.loading import load\n",
        "engine/models/facts.py": "FACTS = {}\n",
        "engine/models/loading.py": "from engine.config import x\nfrom engine.models.facts import FACTS\n",
        "gui/__init__.py": "",
    })
    graph = import_graph(tmp_path)
    assert graph["engine.config"] == {"engine.models", "engine.models.facts"}
    assert graph["engine.models.loading"] == {"engine.config", "engine.models.facts"}  # engine.models has started
    assert cycles(graph) == [["engine.config", "engine.models", "engine.models.loading", "engine.config"]]


def test_from_imports_resolve_to_submodules_and_relative_imports_count(tmp_path):
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/pkg/__init__.py": "from .leaf import y\n",
        "engine/pkg/leaf.py": "y = 1\n",
        "engine/other.py": "from engine.pkg import leaf, y\nfrom . import pkg\n",
        "gui/__init__.py": "",
    })
    graph = import_graph(tmp_path)
    assert graph["engine.other"] == {"engine.pkg.leaf", "engine.pkg"}
    assert graph["engine.pkg"] == {"engine.pkg.leaf"}
    assert cycles(graph) == []


def test_type_checking_imports_do_not_count(tmp_path):
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/a.py": "from typing import TYPE_CHECKING\nimport engine.b\n",
        "engine/b.py": "import typing\nif typing.TYPE_CHECKING:\n    import engine.a\nelse:\n    import engine.c\n",
        "engine/c.py": "",
        "gui/__init__.py": "",
    })
    graph = import_graph(tmp_path)
    assert graph["engine.b"] == {"engine.c"}
    assert cycles(graph) == []
