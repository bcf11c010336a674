"""Access to the `lance_model` library, imported the way this pack was imported.

Inside ComfyUI the pack is a package (`<pack>.lance_nodes`), so the library is `<pack>.lance_model`; under pytest
(or after `pip install -e .`) both are top-level. Importing it lazily keeps node registration independent of the
library's import cost and of optional pieces (flash-attn...).
"""
from __future__ import annotations

import importlib

_PARENT = (__package__ or "").rpartition(".")[0]
_NAME = f"{_PARENT}.lance_model" if _PARENT else "lance_model"


def lance_model():
    return importlib.import_module(_NAME)


def errors():
    return importlib.import_module(f"{_NAME}.errors")


def input_error(message: str) -> Exception:
    """The error for checks the nodes do themselves (a ValueError; the message names the input)."""
    return InputError(message)


# ---------------------------------------------------------------- errors shown on the node
# ComfyUI shows "<module>.<class>: message" on the node; inside ComfyUI the pack's modules are named after its
# folder path, which makes that unreadable. Library errors are re-raised as these short-named equivalents.
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


def translate(exc: Exception) -> Exception | None:
    """The node-level error for a library error (None when it is not one: let it through unchanged)."""
    lib = errors()
    if isinstance(exc, lib.Cancelled):
        return None
    if isinstance(exc, lib.InputError):
        return InputError(str(exc))
    if isinstance(exc, lib.CheckpointError):
        return CheckpointError(str(exc))
    if isinstance(exc, lib.OutOfMemory):
        return OutOfMemory(str(exc))
    if isinstance(exc, lib.LanceError):
        return LanceNodeError(str(exc))
    return None


def node_errors(execute):
    """Decorator for a node's execute(): library errors become short-named node errors. Everything else
    (ComfyUI's InterruptProcessingException, torch OOM, bugs) passes through untouched."""
    import functools

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
