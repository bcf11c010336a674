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
    """An error of the library's InputError type (a ValueError), for checks the nodes do themselves."""
    try:
        return errors().InputError(message)
    except Exception:  # noqa: BLE001 - library not importable: still a clear ValueError
        return ValueError(message)
