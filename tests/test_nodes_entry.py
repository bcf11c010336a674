"""The pack's entry point: imports cleanly outside ComfyUI (exports nothing), registers the extension inside."""
import asyncio
import importlib.util
import os
import subprocess
import sys

from tests.fixtures.comfy_env import REPO_ROOT

LOAD_PACK = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lance_pack", {str(REPO_ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO_ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["lance_pack"] = pack; spec.loader.exec_module(pack)
print(sorted(pack.__all__))
print(any(m == "comfy" or m.startswith("comfy.") for m in sys.modules))
"""


def test_root_init_outside_comfyui():
    """No comfy on the path (as under pytest / plain python): imports, exports nothing, imports no comfy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", LOAD_PACK], capture_output=True, text=True, env=env,
                         cwd=str(REPO_ROOT.parent), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def test_root_init_inside_comfyui(comfy):
    spec = importlib.util.spec_from_file_location("lance_pack_inside", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["lance_pack_inside"] = pack
    spec.loader.exec_module(pack)
    assert pack.__all__ == ["comfy_entrypoint", "LanceExtension"]
    extension = asyncio.run(pack.comfy_entrypoint())
    asyncio.run(extension.on_load())
    node_list = asyncio.run(extension.get_node_list())
    from lance_nodes import NATIVE_NODE_IDS, NODE_IDS
    assert [n.define_schema().node_id for n in node_list] == list(NODE_IDS) + list(NATIVE_NODE_IDS)
    assert "lance" in comfy.folder_names_and_paths
    # inside the package the library is the pack's own copy
    assert sys.modules["lance_pack_inside.lance_nodes.library"].lance_model is sys.modules["lance_pack_inside.lance_model"]


def test_lance_nodes_package_needs_no_comfy():
    out = subprocess.run([sys.executable, "-c", "import lance_nodes, sys; print(len(lance_nodes.NODE_IDS), "
                          "any(m.startswith('comfy') for m in sys.modules))"],
                         capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9", "False"]
