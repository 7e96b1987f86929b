"""Imports in src/tah run one way: no module imports, directly or through others, a module that
imports it back. A cycle makes the import order matter (a half-initialised module is read) and ties
rooms together that should be separable (the toy pipeline once ran the CLI, which runs the toy)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    """tah/model/lora.py -> tah.model.lora; a package is its __init__: tah/model/__init__.py -> tah.model."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports for type checkers, never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST):
    """Every import statement that can run: at module level and inside functions and classes, skipping
    only the bodies of `if TYPE_CHECKING:` blocks (their `else:` still runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if is_type_checking_block(node):
            for child in node.orelse:
                yield from runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        yield from runtime_imports(node)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]):
    """The tah modules an import statement loads. `import tah.x.y` loads tah.x.y; `from tah.x import y`
    loads the package or module tah.x (its __init__ runs) and tah.x.y as well when that is a module."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in modules)
        return
    if node.level:  # relative: from the importer's package (or the package itself, for an __init__)
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source in modules:
        yield source
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            yield f"{source}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    """{module: the tah modules it imports} over every module under src/tah, self-imports left out."""
    files = {module_name(path): path for path in sorted((SRC / "tah").rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {target for node in runtime_imports(tree)
                       for target in imported_modules(node, name, is_package, set(files))} - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through each strongly connected group of two or more modules."""
    return [cycle_within(group, graph) for group in cyclic_groups(graph)]


def cyclic_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of two or more modules: each module in one reaches every other."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def cycle_within(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module (by name), as a path that returns to it."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def test_src_tah_has_no_import_cycle():
    graph = import_graph()
    found = [f"{' -> '.join(cycle_within(group, graph))}   (cycle group: {', '.join(sorted(group))})"
             for group in cyclic_groups(graph)]
    assert not found, "import cycles in src/tah:\n" + "\n".join(found)


def test_the_graph_sees_function_level_and_package_imports():
    graph = import_graph()
    assert "tah.toy.demo" in graph["tah.cli"]  # `from tah.toy.demo import run_demo` inside _demo()
    assert "tah.eval" in graph["tah.toy.demo"]  # `from tah.eval import write_results`: the package's __init__
    assert "tah.model" not in graph["tah"]  # under `if TYPE_CHECKING:` only


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_find_cycles_names_the_cycle(graph, cycle):
    assert find_cycles(graph) == ([cycle] if cycle else [])
