"""Structural checks of the package (issue #11): no import cycle between its modules (imports
inside functions included), no C++ inside Python strings, no private names imported across
modules of the optimizer core."""

from __future__ import annotations

import ast
from pathlib import Path

import torchcame

PACKAGE = Path(torchcame.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names imported) for every import in the file, resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            # "from . import x" imports the submodule x
            for n in names:
                if f"{module}.{n}".replace("..", ".") in _ALL:
                    out.append((f"{module}.{n}", []))
            out.append((module, names))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
    return out


_FILES = sorted(PACKAGE.rglob("*.py"))
_ALL = {_module_name(p) for p in _FILES}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _FILES:
        src = _module_name(path)
        deps = set()
        for module, _ in _imports(path):
            if module in _ALL and module != src:
                deps.add(module)
        graph[src] = deps
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if dep.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_cpp_inside_python_strings():
    for path in _FILES:
        text = path.read_text()
        assert "#include <" not in text, f"C++ source inside {path}"


CORE = ("came", "functional", "state", "options", "_factored", "lowbit", "distributed",
        "step_in_backward", "_impl")


def test_core_imports_no_private_names_across_modules():
    for path in _FILES:
        name = _module_name(path)
        if not any(name == f"torchcame.{c}" or name.startswith(f"torchcame.{c}.") for c in CORE):
            continue
        for module, names in _imports(path):
            if module.startswith("torchcame") and module != name:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{name} imports private {private} from {module}"
