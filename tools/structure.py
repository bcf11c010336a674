"""The structure of the library: its wings, the modules in each, and the imports between them, from the source.

    python tools/structure.py [package folder, default lance_model]

`lance_model/` is four wings and a facade, layered one way only (docs/library.md): `io` (media in and out) and
`errors` at the bottom, then `nn` (the network and its weights), `runtime` (where weights live and how one call
runs), `tasks` (what each task does), and the facade (`pipeline`, `cli`, the package itself) on top. A module may
import its own wing and the wings below it, never one above (tests/test_structure.py), and no module imports
another that imports it back (a cycle). The command prints each wing's modules, and per pair of wings how many
imports cross from one to the other.
"""
from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bottom to top: a module may import only its own layer and those before it
LAYERS = ("errors", "io", "nn", "runtime", "tasks", "facade")
FACADE = "facade"


def module_names(folder: Path) -> dict[str, Path]:
    """Dotted module name (relative to the package: "nn.llm", "pipeline") -> its file; packages' __init__ too."""
    names = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(importer: str, is_package: bool, level: int, target: str | None, names: set[str]) -> list[str]:
    """The package modules a relative import names (`from ..nn.llm import X`, `from .tasks import generation`)."""
    base = importer.split(".") if importer else []
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    stem = ".".join(base + (target.split(".") if target else []))
    return [stem] if stem in names else []


def package_imports(folder: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative imports; `from .wing import module` names a module)."""
    files = module_names(folder)
    names = set(files)
    graph = {}
    for name, path in files.items():
        used = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            is_package = path.name == "__init__.py"
            found = _resolve(name, is_package, node.level, node.module, names)
            used.update(found)
            for alias in node.names:   # `from .tasks import generation`: the submodule itself
                prefix = ".".join(part for part in (found[0] if found else "", alias.name) if part)
                if prefix in names:
                    used.add(prefix)
        graph[name] = used - {name, ""}
    return graph


def layer_of(module: str) -> str:
    head = module.split(".")[0]
    return head if head in LAYERS else FACADE


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports a wing above its own."""
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    return sorted((module, used) for module, deps in graph.items() for used in deps
                  if rank[layer_of(used)] > rank[layer_of(module)])


def cycle(graph: dict[str, set[str]]) -> set[str]:
    """Modules on an import cycle (empty when there is none)."""
    done: set[str] = set()
    remaining = dict(graph)
    while remaining:
        ready = [m for m, deps in remaining.items() if deps <= done | {d for d in deps if d not in graph}]
        if not ready:
            return set(remaining)
        for module in ready:
            done.add(module)
            del remaining[module]
    return set()


def external_imports(folder: Path) -> dict[str, set[str]]:
    """module -> top-level names of its absolute imports (torch, transformers, comfy, ...)."""
    found = {}
    for name, path in module_names(folder).items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[name or "__init__"] = names
    return found


def main(argv: list[str]) -> int:
    folder = REPO / (argv[0] if argv else "lance_model")
    graph = package_imports(folder)
    for layer in reversed(LAYERS):
        modules = sorted(m.split(".")[-1] or "__init__" for m in graph
                         if layer_of(m) == layer and not (m == layer and (folder / layer).is_dir()))
        print(f"{layer:8} {', '.join(modules) or '(none)'}")
    crossings = Counter((layer_of(m), layer_of(d)) for m, deps in graph.items() for d in deps
                        if layer_of(m) != layer_of(d))
    print("imports between wings (importer -> imported: count):")
    for (importer, imported), count in sorted(crossings.items(), key=lambda item: (LAYERS.index(item[0][0]),
                                                                                   LAYERS.index(item[0][1]))):
        print(f"  {importer:8} -> {imported:8} {count}")
    problems = 0
    for importer, imported in upward_imports(graph):
        print(f"upward import: {importer} ({layer_of(importer)}) imports {imported} ({layer_of(imported)})")
        problems += 1
    if cycle(graph):
        print("on a cycle: " + ", ".join(sorted(cycle(graph))))
        problems += 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
