"""A small explicit KV cache: per layer, preallocated keys/values [B, Hkv, capacity, D]."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, rows: slice = slice(None)) -> None:
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: writing up to position {end} but capacity is {self.capacity}")
        self.keys[layer][rows, :, start:end] = k
        self.values[layer][rows, :, start:end] = v

    def read(self, layer: int, end: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][rows, :, :end], self.values[layer][rows, :, :end]

    def copy_rows(self, source: int, targets: range, length: int) -> None:
        """Duplicate a prefilled row (e.g. one prompt prefix shared by several seeds)."""
        for keys, values in zip(self.keys, self.values):
            keys[targets.start:targets.stop, :, :length] = keys[source:source + 1, :, :length]
            values[targets.start:targets.stop, :, :length] = values[source:source + 1, :, :length]
