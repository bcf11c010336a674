"""Attention backends behind one small interface.

`attend(q, k, v, mask)` takes q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (GQA: Hq a multiple of Hkv) and an optional
boolean mask broadcastable to [B, 1, Lq, Lk] (True = may attend). SDPA is the default on every device;
flash-attn is used only when importable, on CUDA, in half precision, and only for calls it can express
(no mask, or the bottom-right causal mask of a prefill).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

BACKENDS = ("auto", "sdpa", "flash")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class Attention:
    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise InputError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "flash" and not flash_attn_available():
            raise InputError("attention backend 'flash' requested but flash-attn is not installed or CUDA is unavailable; use 'sdpa' or 'auto'")
        self.use_flash = backend == "flash" or (backend == "auto" and flash_attn_available())
        self.name = "flash" if self.use_flash else "sdpa"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                 causal_bottom_right: bool = False) -> torch.Tensor:
        if self.use_flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and mask is None:
            return _flash(q, k, v, causal_bottom_right)
        if causal_bottom_right and q.shape[2] > 1:  # a single query row may see every key
            causal = bottom_right_causal_mask(q.shape[2], k.shape[2], q.device)
            mask = causal if mask is None else mask & causal
        return _sdpa(q, k, v, mask)


def bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Query i (the last q_len of k_len keys) sees keys 0 .. k_len - q_len + i. SDPA's is_causal aligns top-left."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return cols <= rows + offset


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _flash(q, k, v, causal):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)
