"""The packages import one way (README.md, "Layout"): each may import only the packages below it,
and no module takes part in an import circle. Read from the source with `ast`, imports inside
functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bottom first: a package may import those before it, never one after it
ORDER = ["contracts", "ledger", "wire", "verification", "node", "coordinator"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Project modules `path` imports (absolute, relative resolved; `from x import y` counts x.y if it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] in ORDER}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in ORDER for p in (ROOT / pkg).rglob("*.py")}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}


def test_no_package_imports_one_above_it():
    upward = []
    for module, deps in graph().items():
        rank = ORDER.index(module.split(".")[0])
        upward += [f"{module} -> {d}" for d in deps if ORDER.index(d.split(".")[0]) > rank]
    assert not upward, "imports up the order:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    edges = graph()
    # a package's __init__ importing its own submodules is how a package exposes them, not a circle
    edges = {m: {d for d in deps if not (m + ".").startswith(d + ".")} for m, deps in edges.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)
