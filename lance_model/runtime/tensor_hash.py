"""Hashing tensors by value, for the keys of the stores kept across runs (prefix_store.py, encode_store.py)."""
from __future__ import annotations

import torch


def hash_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to a hashlib digest (the bytes are read in place, not copied)."""
    digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy().data)
