"""A fixed-shape decode step, replayed as a CUDA graph on CUDA.

Token-by-token decoding of a 3B model is launch-bound: each token runs hundreds of small kernels. Here one step
has static shapes: the new key/value is written into the preallocated cache at a tensor index, and attention
reads the whole cache capacity under a validity mask. On CUDA the step is captured once and replayed per token
(one launch); elsewhere the same step runs eagerly (that is the path the CPU tests check).
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache
from .llm import LanceLLM, Segment

UND_TOKEN = [Segment(0, 1, False)]


class SlotAttention:
    """Attention binding for one decode token: cache slot given as a tensor, keys masked by `valid`."""

    def __init__(self, llm: LanceLLM, cache: KVCache, slot: torch.Tensor, valid: torch.Tensor):
        self.backend, self.cache, self.slot, self.valid = llm.attention, cache, slot, valid

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(2, self.slot, k)
        values.index_copy_(2, self.slot, v)
        return self.backend(q, keys, values, mask=self.valid)


class StaticDecodeStep:
    def __init__(self, llm: LanceLLM, cache: KVCache, use_graph: bool):
        device = llm.device
        self.llm, self.cache = llm, cache
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, 3, 1, dtype=torch.long, device=device)
        # the last slot: warm-up and capture write there, and it stays masked until a real step rewrites it
        self.slot = torch.full((1,), cache.capacity - 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(1, 1, 1, cache.capacity, dtype=torch.bool, device=device)
        self.attend = SlotAttention(llm, cache, self.slot, self.valid)
        self.graph = None
        self.logits = None
        if use_graph:
            self._capture()

    def _step(self) -> torch.Tensor:
        hidden = self.llm.run_layers(self.llm.embed_text(self.token), self.position, UND_TOKEN, self.attend)
        return self.llm.logits(hidden[:, -1])[0]

    def _capture(self) -> None:
        # warm up on a side stream (lazy inits, autotuning) before capturing, as CUDA graphs require
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, token: int, position: int, slot: int) -> torch.Tensor:
        """Feed `token` at rope position `position` into cache slot `slot`; returns its next-token logits."""
        self.token.fill_(token)
        self.position.fill_(position)
        self.slot.fill_(slot)
        self.valid[..., slot] = True
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits

    def mark_prefix(self, length: int) -> None:
        """The first `length` cache slots hold the prefilled prompt."""
        self.valid[..., :length] = True


def cuda_graphs_usable(llm: LanceLLM) -> bool:
    return llm.device.type == "cuda" and torch.cuda.is_available()
