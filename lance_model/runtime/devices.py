"""Device and dtype resolution with clear errors (e.g. CUDA requested on a machine without it)."""
from __future__ import annotations

import torch

from ..errors import InputError

DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
}


SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def indexed(device: torch.device) -> torch.device:
    """A CUDA device always with its index (`cuda` -> `cuda:N`, N the current device): several torch.cuda calls
    (get/set_per_process_memory_fraction among them) refuse an index-less device, and streams, graphs and caches
    belong to one device. Other devices unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(device: str | torch.device | None = None, what: str = "device") -> torch.device:
    """"auto"/None -> cuda if available else cpu; CUDA always as `cuda:N` (indexed). Another device type (meta,
    xla, ...) or a CUDA/MPS device the machine lacks is an InputError naming `what`."""
    if device is None or str(device) == "auto":
        return indexed(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
    expected = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"{what} must be a device name or torch.device ({expected}), got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"{what} {device!r} is not a valid torch device ({expected})") from exc
    if resolved.type not in SUPPORTED_DEVICE_TYPES:
        raise InputError(f"{what} {device!r} is not supported: Lance runs on {', '.join(SUPPORTED_DEVICE_TYPES)} "
                         f"({expected})")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what} {device!r} requested but CUDA is not available on this machine (use 'cpu' or 'auto')")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"{what} {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return indexed(resolved)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{what} {device!r} requested but MPS is not available on this machine")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto"/None -> bf16 on CUDA (when supported), fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPE_NAMES:
        resolved = DTYPE_NAMES[dtype]
    else:
        raise InputError(f"dtype {dtype!r} is not supported (expected 'auto', 'bf16', 'fp32' or 'fp16')")
    if resolved not in (torch.bfloat16, torch.float32, torch.float16):
        raise InputError(f"dtype {resolved} is not supported (expected bfloat16, float32 or float16)")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"dtype bf16 requested but {torch.cuda.get_device_name(device)} does not support bfloat16; use fp32")
    return resolved
