"""ComfyUI entry point of the Lance node pack (ComfyUI V3: `comfy_entrypoint`).

Imported by ComfyUI from custom_nodes/<pack>/. Outside ComfyUI (pytest, plain `import`), where `comfy_api` is not
importable, it exports nothing ComfyUI-specific and does not fail. Inside ComfyUI, import errors are *not*
swallowed: ComfyUI must report a broken pack as "IMPORT FAILED".
"""
import importlib.util as _importlib_util

__all__ = []


def _inside_comfyui() -> bool:
    try:
        return (_importlib_util.find_spec("comfy_api") is not None
                and _importlib_util.find_spec("folder_paths") is not None)
    except (ImportError, ValueError):
        return False


if __package__ and _inside_comfyui():
    from .lance_nodes.entry import LanceExtension, comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "LanceExtension"]
