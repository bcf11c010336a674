"""The code's structure stays as docs/library.md describes it: the library's wings import downward only and no
module imports another that imports it back (tools/structure.py), every library module lives in its wing, the
library never imports ComfyUI, and the node pack reaches the library through its one accessor
(lance_nodes/library.py)."""
from __future__ import annotations

import re

from structure import FACADE, LAYERS, REPO, cycle, external_imports, layer_of, package_imports, upward_imports

COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "latent_preview",
                 "lance_nodes"}
WINGS = ("io", "nn", "runtime", "tasks")


def test_wings_import_downward_only():
    graph = package_imports(REPO / "lance_model")
    assert not upward_imports(graph), "\n".join(f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
                                                for a, b in upward_imports(graph))
    assert not cycle(graph), f"import cycle among {sorted(cycle(graph))}"


def test_the_checker_sees_an_upward_import():
    graph = {"nn.llm": {"tasks.sampler", "errors"}, "tasks.sampler": {"nn.llm"}, "errors": set()}
    assert upward_imports(graph) == [("nn.llm", "tasks.sampler")]
    assert cycle(graph) == {"nn.llm", "tasks.sampler"}


def test_every_module_lives_in_its_wing():
    """Only the facade (pipeline, command line, package) and errors stand outside the wings."""
    graph = package_imports(REPO / "lance_model")
    loose = sorted(m for m in graph if layer_of(m) == FACADE and m not in ("", "pipeline", "cli", "__main__"))
    assert not loose, f"modules outside the wings {WINGS}: {loose}"
    assert set(LAYERS) == {"errors", *WINGS, FACADE}


def test_docs_list_every_module_under_its_wing():
    """docs/library.md opens with the wings and one line per module: the map and the tree agree."""
    text = (REPO / "docs" / "library.md").read_text()
    listed = set(re.findall(r"`lance_model/((?:[a-z_]+/)?[a-z_0-9]+)\.py`", text))
    modules = {m.replace(".", "/") for m in package_imports(REPO / "lance_model") if m and m not in WINGS}
    assert modules <= listed, f"not in docs/library.md: {sorted(modules - listed)}"


def test_node_modules_import_without_a_cycle():
    graph = package_imports(REPO / "lance_nodes")
    assert not cycle(graph), f"import cycle among {sorted(cycle(graph))}"


def test_the_library_never_imports_comfyui():
    for module, names in external_imports(REPO / "lance_model").items():
        assert not names & COMFY_MODULES, f"lance_model/{module} imports {sorted(names & COMFY_MODULES)}"


def test_nodes_reach_the_library_through_one_accessor():
    for module, names in external_imports(REPO / "lance_nodes").items():
        if module != "library":
            assert "lance_model" not in names, f"lance_nodes/{module}.py imports lance_model directly"
