"""Exceptions raised by lance_model. Every message names the offending input and what was expected."""


class LanceError(Exception):
    """Base class for all errors raised by lance_model."""


class CheckpointError(LanceError):
    """A checkpoint folder or file is missing, malformed, or does not match the expected layout."""


class InputError(LanceError, ValueError):
    """A user input (prompt, image, video, size, step count, context...) is invalid."""


class Cancelled(LanceError):
    """The host asked to stop (e.g. ComfyUI interrupt). The model stays usable."""
