"""Config vs weight-file consistency, checked from the safetensors header BEFORE a module is built.

A corrupt config (e.g. num_hidden_layers 100000) would otherwise build for minutes and grow to gigabytes before
the key check fails. The model a config implies is counted from a layer-free build plus one layer (both on the
meta device, no memory), then compared with the file: its layer count first, then its element count. Element
counts, not bytes, so a BF16 and an F32 release file pass alike.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import CheckpointError
from .checkpoint import state_key_problems


def numel(module: torch.nn.Module) -> int:
    """Elements of a module's state dict (parameters and persistent buffers: what a checkpoint stores)."""
    return sum(math.prod(t.shape) for t in module.state_dict().values())


def file_elements(found: Mapping[str, tuple[int, ...]], keep: Callable[[str], bool]) -> int:
    return sum(math.prod(shape) for key, shape in found.items() if keep(key))


def layer_count(found: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """Number of `<prefix><index>.` layers in a file's keys (highest index + 1; 0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for key in found if (m := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def check_layers(config: Path, field: str, configured: int, weights: Path, in_file: int) -> None:
    if configured != in_file:
        raise CheckpointError(f"{config}: field {field!r} is {configured} but {weights} holds {in_file} layers; "
                              "the config does not belong to these weights (or one of them is corrupt)")


def check_elements(config: Path, fields: str, expected: int, weights: Path, in_file: int,
                   sample_shapes: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    """`sample_shapes`: the keys of a layer-free model plus its first layer, to say which tensors differ."""
    if expected != in_file:
        problems = state_key_problems(sample_shapes, found, ignore=lambda key: True)
        detail = ": " + "; ".join(problems[:12]) if problems else ""
        raise CheckpointError(f"{config}: the model its fields ({fields}) describe has {expected:,} weight elements "
                              f"but {weights} holds {in_file:,}{detail}")
