"""The structure of the library: its modules floor by floor, from the imports in the source.

    python tools/structure.py [package folder, default lance_model]

A module stands one floor above the highest module it imports, so floor 1 imports nothing of the package. A cycle
(modules importing each other) has no floor and is printed as such; tests/test_structure.py keeps there being none.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_imports(folder: Path) -> dict[str, set[str]]:
    """module name -> the package's modules it imports (relative imports: `from .x import`, `from . import x`)."""
    modules = {path.stem for path in folder.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name in sorted(modules):
        tree = ast.parse((folder / f"{name}.py").read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    used.add(node.module.split(".")[0])
                else:
                    used.update(alias.name for alias in node.names)
        graph[name] = used & modules - {name}
    return graph


def external_imports(folder: Path) -> dict[str, set[str]]:
    """module name -> top-level names of absolute imports (torch, transformers, ...)."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[path.stem] = names
    return found


def floors(graph: dict[str, set[str]]) -> tuple[dict[str, int], set[str]]:
    """(module -> floor, modules on a cycle)."""
    floor: dict[str, int] = {}
    remaining = dict(graph)
    while remaining:
        ready = [m for m, deps in remaining.items() if deps <= set(floor)]
        if not ready:
            return floor, set(remaining)
        for module in ready:
            floor[module] = 1 + max((floor[d] for d in graph[module]), default=0)
            del remaining[module]
    return floor, set()


def main(argv: list[str]) -> int:
    folder = REPO / (argv[0] if argv else "lance_model")
    graph = package_imports(folder)
    floor, cycle = floors(graph)
    for level in sorted(set(floor.values()), reverse=True):
        names = sorted(m for m in floor if floor[m] == level)
        print(f"floor {level:2d}  " + ", ".join(names))
    if cycle:
        print("on a cycle: " + ", ".join(sorted(cycle)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
