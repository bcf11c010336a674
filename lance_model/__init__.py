"""lance_model: ByteDance Lance in pure PyTorch (no ComfyUI imports).

    from lance_model import load_lance
    pipe = load_lance("/path/to/downloads")            # the release folder, unchanged
    image = pipe.text_to_image("a red cat", width=768, height=768).frames[0, 0]

Besides the task API, a host with its own sampler (lance_nodes' native path) uses the modules imported first.
"""
from . import branches, checkpoint, generation, guidance, media, request, sampler, settings, velocity  # noqa: F401
from .context import LanceContext, Turn
from .errors import Cancelled, CheckpointError, DecodeOutOfMemory, InputError, LanceError, OutOfMemory
from .generation import GenerationResult
from .pipeline import LancePipeline, load_lance
from .settings import GenerationSettings
from .text_generation import UnderstandingResult
from .understanding import SamplingOptions

__all__ = [
    "Cancelled", "CheckpointError", "DecodeOutOfMemory", "GenerationResult", "GenerationSettings", "InputError", "LanceContext",
    "LanceError", "LancePipeline", "OutOfMemory", "SamplingOptions", "Turn", "UnderstandingResult", "load_lance",
]
