"""The code's structure stays as docs/library.md describes it: the library's modules import each other without a
cycle (tools/structure.py), the library never imports ComfyUI, and the node pack reaches the library through its
one accessor (lance_nodes/library.py)."""
from __future__ import annotations

from structure import REPO, external_imports, floors, package_imports

COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "latent_preview",
                 "lance_nodes"}


def test_library_modules_have_floors():
    floor, cycle = floors(package_imports(REPO / "lance_model"))
    assert not cycle, f"import cycle among {sorted(cycle)}"
    assert floor["pipeline"] > floor["generation"] > floor["sampler"] > floor["branches"]
    assert floor["velocity"] > floor["branches"]


def test_node_modules_have_floors():
    _, cycle = floors(package_imports(REPO / "lance_nodes"))
    assert not cycle, f"import cycle among {sorted(cycle)}"


def test_the_library_never_imports_comfyui():
    for module, names in external_imports(REPO / "lance_model").items():
        assert not names & COMFY_MODULES, f"lance_model/{module}.py imports {sorted(names & COMFY_MODULES)}"


def test_nodes_reach_the_library_through_one_accessor():
    for module, names in external_imports(REPO / "lance_nodes").items():
        if module != "library":
            assert "lance_model" not in names, f"lance_nodes/{module}.py imports lance_model directly"
