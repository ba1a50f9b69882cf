"""The code's layers point one way and no module imports itself round a loop.

    pipeline  <-  deployments  <-  serve_app

``pipeline`` (the library) knows neither Ray, FastAPI nor the service; ``deployments`` (the
model servers and what crosses their handle) knows nothing of ``serve_app`` (HTTP, jobs,
scheduling). Imports are read with ``ast`` (no module is executed), including the lazy ones
inside functions: a cycle through a function-level import is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "deployments", "serve_app")
#: Package -> top-level names it must not import (the layers above it, and service-only libraries).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "pipeline": ("deployments", "serve_app", "ray", "fastapi", "starlette"),
    "deployments": ("serve_app", "fastapi", "starlette"),
    "serve_app": (),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            # `from pkg import module` imports a module, not a name
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def project_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (names that are not modules are dropped)."""
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imp in imports_of(path):
            # `a.b.c` where c is a function: walk up to the longest module name
            while imp and imp not in modules:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_cycle():
    cycles = find_cycles(project_graph())
    assert cycles == [], f"import cycles between modules: {cycles}"


def test_no_package_cycle():
    """Between the three layers (a sub-package such as serve_app.experiments belongs to its layer)."""
    graph: dict[str, set[str]] = {}
    for mod, deps in project_graph().items():
        graph.setdefault(mod.split(".")[0], set()).update(
            d.split(".")[0] for d in deps if d.split(".")[0] != mod.split(".")[0]
        )
    cycles = find_cycles(graph)
    assert cycles == [], f"import cycles between packages: {cycles}"


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_point_one_way(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for imp in sorted(imports_of(path)):
            if imp.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{module_name(path)} imports {imp}")
    assert bad == [], f"{package} imports against the layer direction:\n" + "\n".join(bad)
