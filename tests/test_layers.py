"""The package's shape: no import cycles between imgkit's modules (module-level imports, the ones
that decide import order), and nothing inside imgkit imports the api facade (it is for users; the
CLI is its one internal client)."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "imgkit"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p) for p in ROOT.rglob("*.py")}


def _imports(path: pathlib.Path, lazy: bool) -> set[str]:
    """imgkit modules imported by `path` (module level only, unless `lazy`)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("imgkit"):
                subs = {f"{mod}.{a.name}" for a in node.names} & MODULES  # `from . import api`
                found.update(subs or {mod})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("imgkit"))
    return found


def _graph(lazy: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in _imports(p, lazy) if i in files and i != m} for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles_at_module_level():
    graph = _graph(lazy=False)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_inside_imgkit_imports_the_api_facade():
    graph = _graph(lazy=True)
    users = sorted(m for m, deps in graph.items() if "imgkit.api" in deps
                   and m not in ("imgkit",) and not m.startswith("imgkit.cli"))
    assert users == []
