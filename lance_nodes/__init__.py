"""ComfyUI nodes for ByteDance Lance (V3 schema, `comfy_api.latest`).

Importing this package needs nothing from ComfyUI; `lance_nodes.entry` (the extension) and the node modules do.
"""
NODE_IDS = (
    "LanceLoader", "LanceT2I", "LanceT2V", "LanceEdit", "LanceVideoEdit", "LanceUnderstand", "LancePromptEnhance",
    "LanceDecode", "LanceContextView",
)
# the opt-in native nodes (Lance as a core MODEL, lance_nodes/native_nodes.py)
NATIVE_NODE_IDS = (
    "LanceModel", "LanceConditioning", "LanceScheduler", "LanceNoise", "LanceGuidance", "LanceEditGuider",
)
