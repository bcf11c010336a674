"""Prefilled CFG-branch prefixes kept across runs: running the same request again (another seed, other steps or
guidance scales) skips the prefill of every branch it has already seen.

A prefix's keys/values depend on its packed sequence (ids, modality codes, positions), its input embeddings (which
carry the ViT embeddings and the clean condition latents), the codes its branch drops, how the branch is
positioned, and the weights. The key hashes all of these plus a weights version the host supplies (ComfyUI:
the patches applied to the shared weights), so a LoRA, a replaced file or another request is a miss.

The library sampler and a host's sampler (the native ComfyUI path) share one store, so a prompt repeated on
either path, or alternating between them, skips its prefills. The most recently used branches are kept, in RAM
(not on the GPU, where they would hold memory ComfyUI cannot see), up to `max_entries` branches and `max_bytes`
(least recently used dropped first); a run that fails or is cancelled clears them.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..nn.kv_cache import KVCache
from .tensor_hash import hash_tensor

DEFAULT_MAX_BYTES = 4 * 2**30
DEFAULT_MAX_ENTRIES = 8      # branches: a few requests of two or three branches each


@dataclass
class StoredPrefix:
    keys: list[torch.Tensor]     # per layer [Hkv, length, D], CPU
    values: list[torch.Tensor]
    length: int
    query_pos: torch.Tensor      # [3, target block length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _digest(seq, embeds: torch.Tensor) -> bytes:
    """A hash of what a sequence's prefixes are computed from: ids, modality codes, positions, embeddings."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in (seq.ids, seq.codes, seq.positions, embeds):
        hash_tensor(digest, tensor)
    return digest.digest()


class PrefixStore:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[str, StoredPrefix] = OrderedDict()   # least recently used first
        self._wanted: set[str] = set()
        self.hits = 0

    @staticmethod
    def keys(branches: list[tuple], context: tuple) -> list[str]:
        """One key per branch (seq, embeds, dropped codes, positions). `context`: what else the keys/values depend
        on (dtype, weights version). Branches of one sequence share its digest: the large tensors are hashed once."""
        digests: dict[tuple[int, int], bytes] = {}
        keys = []
        for seq, embeds, dropped, positions in branches:
            ident = (id(seq), id(embeds))
            if ident not in digests:
                digests[ident] = _digest(seq, embeds)
            keys.append(digests[ident].hex() + repr((dropped, positions, context)))
        return keys

    def begin(self, keys: list[str]) -> None:
        """A request with these branch keys starts: they become the most recently used, and are never evicted to
        make room for each other."""
        self._wanted = set(keys)
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    def restore(self, key: str, cache: KVCache, row: int) -> StoredPrefix | None:
        """Write a stored prefix into cache row `row`; None when it is not stored."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        for layer, (k, v) in enumerate(zip(entry.keys, entry.values)):
            cache.write(layer, 0, k.unsqueeze(0).to(cache.keys[layer]), v.unsqueeze(0).to(cache.values[layer]),
                        slice(row, row + 1))
        self.hits += 1
        return entry

    def save(self, key: str, cache: KVCache, row: int, length: int, query_pos: torch.Tensor) -> None:
        """Keep cache row `row`'s first `length` positions if they fit beside the current request's other
        prefixes (older requests' prefixes are dropped for it)."""
        if key not in self._wanted:
            return
        size = 2 * sum(k[row, :, :length].numel() * k.element_size() for k in cache.keys)
        in_use = sum(entry.nbytes for k, entry in self._entries.items() if k in self._wanted)
        if size + in_use > self.max_bytes:
            return
        self._entries[key] = StoredPrefix([k[row, :, :length].to("cpu", copy=True) for k in cache.keys],
                                          [v[row, :, :length].to("cpu", copy=True) for v in cache.values],
                                          length, query_pos)
        self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            oldest = next(iter(self._entries))
            if oldest in self._wanted:   # only the current request's prefixes are left
                break
            del self._entries[oldest]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
