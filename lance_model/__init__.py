"""lance_model: ByteDance Lance in pure PyTorch (no ComfyUI imports).

    from lance_model import load_lance
    pipe = load_lance("/path/to/downloads")            # the release folder, unchanged
    image = pipe.text_to_image("a red cat", width=768, height=768).frames[0, 0]

The package is four wings under the facade (pipeline.py, cli.py), each importing only the ones below it:
tasks/ (what each task does) > runtime/ (where weights live, how one call runs) > nn/ (the network and its weights)
> io/ (media in and out), all over errors.py (docs/library.md). Besides the task API, a host with its own sampler
(lance_nodes' native path) uses the modules loaded here.
"""
from .errors import Cancelled, CheckpointError, DecodeOutOfMemory, InputError, LanceError, OutOfMemory
from .io import media, validation  # noqa: F401
from .nn import checkpoint  # noqa: F401
from .pipeline import LancePipeline, load_lance
from .runtime import session  # noqa: F401
from .tasks import branches, generation, guidance, request, sampler, settings, velocity  # noqa: F401
from .tasks.context import LanceContext, Turn
from .tasks.generation import GenerationResult
from .tasks.settings import GenerationSettings
from .tasks.text_generation import UnderstandingResult
from .tasks.understanding import SamplingOptions

__all__ = [
    "Cancelled", "CheckpointError", "DecodeOutOfMemory", "GenerationResult", "GenerationSettings", "InputError", "LanceContext",
    "LanceError", "LancePipeline", "OutOfMemory", "SamplingOptions", "Turn", "UnderstandingResult", "load_lance",
]
