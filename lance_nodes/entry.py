"""The ComfyUI extension: registers the `lance` model folder and lists the nodes."""
from __future__ import annotations

from .compat import ComfyExtension, io, register_model_folder
from .native_nodes import NATIVE_NODES
from .nodes import NODES

register_model_folder()  # at import: 0.3.64 never calls ComfyExtension.on_load()


class LanceExtension(ComfyExtension):
    async def on_load(self) -> None:  # called by newer ComfyUI versions
        register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES) + list(NATIVE_NODES)


async def comfy_entrypoint() -> LanceExtension:
    register_model_folder()
    return LanceExtension()
