"""Errors shown on a node. ComfyUI shows "<module>.<class>: message"; inside ComfyUI the pack's modules are named
after its folder path, which makes that unreadable, so library errors are re-raised as these short-named
equivalents."""
from __future__ import annotations

import functools

from .library import lance_model


class LanceNodeError(Exception):
    """A Lance error raised by a node (bad input, bad model folder)."""


class InputError(LanceNodeError, ValueError):
    """A node input is invalid; the message names the input."""


class CheckpointError(LanceNodeError):
    """The selected model folder is missing, a file, or incomplete."""


class OutOfMemory(LanceNodeError):
    """The run needed more memory than the device has; what it allocated was freed, the model stays loaded.
    (Not a torch OOM on purpose: ComfyUI answers those by unloading every model.)"""


for _cls in (LanceNodeError, InputError, CheckpointError, OutOfMemory):
    _cls.__module__ = "lance"


# The Lance Loader's memory_mode choices that keep less in VRAM than each mode, in the order to try them
LESS_VRAM = {"resident": ("auto", "stream", "offload"), "dynamic": ("auto", "stream", "offload"),
             "auto": ("stream", "offload"), "stream": ("offload",)}
# its weight_dtype choices with smaller weights than each one: the last resort, as fp8 weights change the results
SMALLER_WEIGHTS = {"default": ("fp8_e4m3fn", "fp8_e4m3fn (both experts)"),
                   "fp8_e4m3fn": ("fp8_e4m3fn (both experts)",)}
FP8_MEMORY_MODES = ("auto", "stream")   # the memory modes the Loader takes fp8 weights with (Lance places them)


def out_of_memory(exc, model, loader_modes, inputs: str = "", runs_llm: bool = True, kept: str = "") -> OutOfMemory:
    """The node's error for the library's OutOfMemory `exc`, naming only what the artist can change in ComfyUI (the
    library's own advice speaks of load_lance's arguments): what ran out, the Loader settings in use, what became of
    sampled latents (`kept`), then the remedies - the Loader's memory_mode choices (among `loader_modes`) that keep
    less in VRAM, the node's `inputs` that shrink the request, and, for a node that runs the LLM, fp8 weights."""
    weight_dtype = getattr(model, "weight_dtype", "default")
    in_use = f"memory_mode '{model.memory_mode}'" + (f", weight_dtype '{weight_dtype}'"
                                                     if weight_dtype != "default" else "")
    remedies = []
    modes = [mode for mode in LESS_VRAM.get(model.memory_mode, ()) if mode in loader_modes]
    if modes:
        remedies.append(f"set the Lance Loader's memory_mode to {_either(modes)} (less in VRAM, slower)")
    if inputs:
        remedies.append(inputs)
    todo = "; or ".join(remedies) or "free the memory other programs hold"
    dtypes = SMALLER_WEIGHTS.get(weight_dtype, ()) if runs_llm else ()
    if dtypes:
        modes = "" if model.memory_mode in FP8_MEMORY_MODES else f" with memory_mode {_either(FP8_MEMORY_MODES)}"
        todo += (f"; or, as a last resort, set the Lance Loader's weight_dtype to {_either(dtypes)}{modes} "
                 f"(smaller weights, but the results change)")
    kept = f" {kept}" if kept else ""
    return OutOfMemory(f"{exc.facts} (Lance Loader: {in_use}).{kept} To run it in less memory: {todo}. The model is "
                       f"still loaded and usable.")


def _either(choices) -> str:
    quoted = [f"'{choice}'" for choice in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def input_error(message: str) -> InputError:
    """The error for checks the nodes do themselves (the message names the input)."""
    return InputError(message)


def translate(exc: Exception) -> Exception | None:
    """The node-level error for a library error (None when it is not one: let it through unchanged)."""
    if isinstance(exc, lance_model.Cancelled):
        return None
    for library_error, node_error in ((lance_model.InputError, InputError),
                                      (lance_model.CheckpointError, CheckpointError),
                                      (lance_model.OutOfMemory, OutOfMemory),
                                      (lance_model.LanceError, LanceNodeError)):
        if isinstance(exc, library_error):
            return node_error(str(exc))
    return None


def node_errors(execute):
    """Decorator for a node's execute(): library errors become short-named node errors. Everything else
    (ComfyUI's InterruptProcessingException, torch OOM, bugs) passes through untouched."""
    @functools.wraps(execute)
    def wrapper(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it is a library error
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc
    return wrapper
