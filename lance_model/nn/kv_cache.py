"""A small explicit KV cache: per layer one preallocated tensor [2, B, Hkv, capacity, D] holding the keys and
the values side by side, so one indexed store writes both; `keys[layer]` / `values[layer]` are its two halves."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (2, batch, kv_heads, capacity, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keys = [kv[0] for kv in self.kv]
        self.values = [kv[1] for kv in self.kv]
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, rows: slice = slice(None)) -> None:
        """k/v [rows, Hkv, n, D] written at positions start .. start + n (restoring a stored prefix)."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: writing up to position {end} but capacity is {self.capacity}")
        self.keys[layer][rows, :, start:end] = k
        self.values[layer][rows, :, start:end] = v

    def store(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [R, L, Hkv, D] stored at (rows [R, 1], positions [R, L]) in one indexed store."""
        rows, positions = index
        self.kv[layer][:, rows, :, positions] = torch.stack([k, v], dim=2)

    def read(self, layer: int, end: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of rows `rows`' keys and values up to position `end` (they follow later stores)."""
        keys, values = self.keys[layer], self.values[layer]
        if rows.start in (None, 0) and rows.stop in (None, self.batch):
            return keys[:, :, :end], values[:, :, :end]
        return keys[rows, :, :end], values[rows, :, :end]

    def copy_rows(self, source: int, targets: range, length: int) -> None:
        """Duplicate a prefilled row (e.g. one prompt prefix shared by several seeds)."""
        for kv in self.kv:
            kv[:, targets.start:targets.stop, :, :length] = kv[:, source:source + 1, :, :length]
