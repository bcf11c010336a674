"""lance_model: ByteDance Lance in pure PyTorch (no ComfyUI imports).

    from lance_model import load_lance
    pipe = load_lance("/path/to/downloads")            # the release folder, unchanged
    image = pipe.text_to_image("a red cat", width=768, height=768).frames[0, 0]
"""
from .context import LanceContext, Turn
from .errors import Cancelled, CheckpointError, InputError, LanceError, OutOfMemory
from .pipeline import GenerationResult, GenerationSettings, LancePipeline, UnderstandingResult, load_lance
from .understanding import SamplingOptions

__all__ = [
    "Cancelled", "CheckpointError", "GenerationResult", "GenerationSettings", "InputError", "LanceContext",
    "LanceError", "LancePipeline", "OutOfMemory", "SamplingOptions", "Turn", "UnderstandingResult", "load_lance",
]
