"""Exceptions raised by lance_model. Every message names the offending input and what was expected."""


class LanceError(Exception):
    """Base class for all errors raised by lance_model."""


class CheckpointError(LanceError):
    """A checkpoint folder or file is missing, malformed, or does not match the expected layout."""


class InputError(LanceError, ValueError):
    """A user input (prompt, image, video, size, step count, context...) is invalid."""


class Cancelled(LanceError):
    """The host asked to stop (e.g. ComfyUI interrupt). The model stays usable."""


class OutOfMemory(LanceError, MemoryError):
    """A request needs more memory than the device has (estimated up front, or a real out-of-memory error).
    What the call allocated is freed first; the model stays usable. `facts` is what ran out and where, without
    the library's advice and memory-mode names: a host whose users have other remedies words its own."""

    def __init__(self, message: str, facts: str | None = None):
        super().__init__(message)
        self.facts = message if facts is None else facts


class DecodeOutOfMemory(OutOfMemory):
    """Sampling finished but decoding the latents ran out of memory, even tiled after freeing what sampling
    held. The sampled work is not lost: `result` holds the latents (frames None) for a later or tiled decode."""

    def __init__(self, message: str, result, facts: str | None = None):
        super().__init__(message, facts)
        self.result = result


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of an exception's message (torch's out-of-memory and compiler errors run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default
