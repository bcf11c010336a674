"""Type and range checks for the library's API arguments: every failure is an `InputError` naming the argument.

Python's bool is an int subclass; it is refused where a number is expected (`batch_size=True` is a mistake).
"""
from __future__ import annotations

import math
import numbers

import torch

from ..errors import InputError

SEED_MAX = 2**64 - 1   # torch.Generator.manual_seed accepts 0 .. 2^64 - 1
# how far outside 0..1 a pixel may stray and still be clamped: resampling overshoots (ComfyUI's bicubic Upscale Image
# leaves values down to about -0.4 and up to 1.4 at sharp edges); 0..255 data and garbage lie far beyond
PIXEL_SLACK = 0.5


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if not is_int(value):
        raise InputError(f"{name} must be an integer{_range_text(minimum, maximum)}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be an integer{_range_text(minimum, maximum)}, got {value}")
    return value


def require_float(value, name: str, minimum: float | None = None, maximum: float | None = None,
                  above: float | None = None) -> float:
    """A finite real number (ints accepted) with optional bounds; `above` is an exclusive lower bound."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if above is not None and not value > above:
        raise InputError(f"{name} must be > {above}, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be in {_bounds(minimum, maximum)}, got {value}")
    return value


def require_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def require_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def require_callable(value, name: str):
    if value is not None and not callable(value):
        raise InputError(f"{name} must be a function or None, got {type(value).__name__}")
    return value


def require_seed(value, name: str = "seed") -> int:
    return require_int(value, name, 0, SEED_MAX)


def require_finite_tensor(value, name: str) -> torch.Tensor:
    """A real floating-point tensor without NaN/Inf."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise InputError(f"{name} contains NaN or infinite values; expected finite numbers")
    return value


def require_unit_range(values: torch.Tensor, name: str) -> torch.Tensor:
    """Pixels in 0..1, give or take a resampling overshoot: values clearly outside are refused, not clamped, as they
    are data of another scale (usually 0..255) that would otherwise become a white or meaningless picture."""
    if values.numel():
        low, high = (float(v) for v in values.detach().aminmax())
        if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
            cause = ("0..255 data? divide it by 255" if high <= 255 + PIXEL_SLACK and low >= -PIXEL_SLACK
                     else "check what produced it")
            raise InputError(f"{name} has pixel values from {low:g} to {high:g}; expected values in 0..1 ({cause})")
    return values


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in {minimum}..{maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _bounds(minimum, maximum) -> str:
    return f"[{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}]"
