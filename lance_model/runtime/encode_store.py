"""Media encodings kept across runs: the VAE posterior (mean, log-variance) and the ViT embeddings of recent
source media, so re-running an edit or an i2v request with another seed, step count or guidance encodes
nothing again (for a video edit these encodes are most of the preparation).

An entry is keyed on the stage, the exact pixels (dtype, shape and a hash of the bytes) and a context the caller
supplies (dtype, weights version): other media, another preset size or patched weights are a miss. The
posterior is stored rather than a sample, so seeded sampling still draws per seed. Entries live in RAM, a few
at most, and are cleared with the prefixes after a failed or cancelled run.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import torch

from .tensor_hash import hash_tensor

DEFAULT_MAX_ENTRIES = 4
DEFAULT_MAX_BYTES = 2**30


def _nbytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class EncodeStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.device, ...]]] = OrderedDict()
        self.hits = 0

    def get_or_compute(self, stage: str, pixels: torch.Tensor, context: tuple,
                       compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """`compute()`'s tensors for these pixels, from the store when the same stage saw them in this context."""
        key = self._key(stage, pixels, context)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            stored, devices = self._entries[key]
            return tuple(t.to(device, copy=True) for t, device in zip(stored, devices))   # callers own them
        result = compute()
        if _nbytes(result) <= self.max_bytes:
            self._entries[key] = (tuple(t.detach().to("cpu", copy=True) for t in result), tuple(t.device for t in result))
            self._evict()
        return result

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries or sum(_nbytes(e[0]) for e in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)

    @staticmethod
    def _key(stage: str, pixels: torch.Tensor, context: tuple) -> str:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(repr((stage, context)).encode())
        hash_tensor(digest, pixels)
        return digest.hexdigest()
