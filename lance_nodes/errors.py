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
