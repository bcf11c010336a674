"""Prefilled CFG-branch prefixes kept across runs: running the same request again (another seed, other steps or
guidance scales) skips the prefill of every branch it has already seen.

A prefix's keys/values depend on its packed sequence (ids, modality codes, positions), its input embeddings (which
carry the ViT embeddings and the clean condition latents), the codes its branch drops, how the branch is
positioned, and the weights. The key hashes all of these plus a weights version the host supplies (ComfyUI:
the patches applied to the shared weights), so a LoRA, a replaced file or another request is a miss.

Only the last request's branches are kept, in RAM (not on the GPU, where they would hold memory ComfyUI cannot
see), up to `max_bytes`; a run that fails or is cancelled clears them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .kv_cache import KVCache

DEFAULT_MAX_BYTES = 4 * 2**30


@dataclass
class StoredPrefix:
    keys: list[torch.Tensor]     # per layer [Hkv, length, D], CPU
    values: list[torch.Tensor]
    length: int
    query_pos: torch.Tensor      # [3, target block length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def hash_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to a hashlib digest (the bytes are read in place, not copied)."""
    digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy().data)


def _digest(seq, embeds: torch.Tensor) -> bytes:
    """A hash of what a sequence's prefixes are computed from: ids, modality codes, positions, embeddings."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in (seq.ids, seq.codes, seq.positions, embeds):
        hash_tensor(digest, tensor)
    return digest.digest()


class PrefixStore:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: dict[str, StoredPrefix] = {}
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
        """A new request with these branch keys: forget every other request's prefixes."""
        self._wanted = set(keys)
        self._entries = {k: v for k, v in self._entries.items() if k in self._wanted}

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
        if key not in self._wanted:
            return
        size = 2 * sum(k[row, :, :length].numel() * k.element_size() for k in cache.keys)
        if size + self.nbytes > self.max_bytes:
            return
        self._entries[key] = StoredPrefix([k[row, :, :length].to("cpu", copy=True) for k in cache.keys],
                                          [v[row, :, :length].to("cpu", copy=True) for v in cache.values],
                                          length, query_pos)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
