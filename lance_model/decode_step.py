"""Token-by-token decoding: one generated token per call, with static shapes and all of its state on the device.

A step embeds the current token, runs the layers against the preallocated KV cache (the new key/value stored at
the slot tensor's position, attention over the whole capacity under a validity mask), and chooses the next token
on the device (TokenChooser): only the token id ever needs to reach the host, and only when the caller reads it.
With greedy decoding on CUDA the whole step is captured once as a CUDA graph and replayed per token; elsewhere the
same step runs eagerly (the path the CPU tests check).
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache
from .llm import UND, LanceLLM
from .positions import Rope


class TokenChooser:
    """The next token from logits [1, 1, V] on their device: greedy (argmax), or temperature / top-k / top-p
    sampling with a repetition penalty. Sampling draws from a generator on the logits' device seeded with the
    given seed: on the CPU the choices are those of the CPU code before; a CUDA generator draws another stream,
    so a seed gives other (equally valid) samples on a GPU."""

    def __init__(self, sampling, vocab_limit: int, vocab: int, device: torch.device):
        self.options, self.vocab_limit = sampling, vocab_limit
        self.greedy = sampling.temperature == 0 and sampling.repetition_penalty == 1.0
        self.generator = (torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None
                          else None)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device) if sampling.repetition_penalty != 1.0 else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """-> the token [1, 1] (int64, on the logits' device)."""
        if self.greedy:
            return logits[..., :self.vocab_limit].argmax(dim=-1)
        token = self._sample(logits[0, 0].float().clone())
        if self.seen is not None:
            self.seen.index_fill_(0, token.view(1), True)
        return token.view(1, 1)

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        options = self.options
        scores[self.vocab_limit:] = float("-inf")   # rows past the tokenizer are untrained padding
        if self.seen is not None:
            penalty = options.repetition_penalty
            scores = torch.where(self.seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
        if options.temperature == 0:
            return scores.argmax()
        scores = scores / options.temperature
        if options.top_k:   # masked_fill_, not boolean-mask assignment: that finds the mask's indices on the host
            kth = torch.topk(scores, min(options.top_k, scores.numel())).values[-1]
            scores.masked_fill_(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if options.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            sorted_probs.masked_fill_(sorted_probs.cumsum(0) - sorted_probs > options.top_p, 0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return self._draw(probs / probs.sum())

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token drawn with probabilities `probs`: the index of the largest probs / Exp(1) noise. This is
        torch.multinomial's own one-sample method (the same draws from the same generator), without its check of
        the probabilities, which reads them on the host (a device sync per token on CUDA)."""
        noise = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return (probs / noise).argmax()


class SlotAttention:
    """Attention binding of one decode token: its key/value stored at the slot tensor's position, attention over
    the cache's whole capacity under the validity mask."""

    def __init__(self, llm: LanceLLM, cache: KVCache, slot: torch.Tensor, valid: torch.Tensor):
        self.backend, self.cache, self.valid = llm.attention, cache, valid
        self.index = (torch.zeros(1, 1, dtype=torch.long, device=slot.device), slot.view(1, 1))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.store(layer, self.index, k, v)
        out = self.backend(q.transpose(1, 2), self.cache.keys[layer], self.cache.values[layer], mask=self.valid)
        return out.reshape(1, 1, -1)


class DecodeStep:
    """Generates token after token into `ids` (indexed by cache slot) from the prompt prefilled into `cache`."""

    def __init__(self, llm: LanceLLM, cache: KVCache, prompt_len: int, first_position: int, chooser: TokenChooser,
                 use_graph: bool):
        device, capacity = llm.device, cache.capacity
        self.llm, self.chooser, self.prompt_len = llm, chooser, prompt_len
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(1, 1, 1, capacity, dtype=torch.bool, device=device)
        self.valid[..., :prompt_len] = True
        self.ids = torch.zeros(capacity, 1, dtype=torch.long, device=device)   # the token fed at each slot
        slots = torch.arange(capacity, device=device) - prompt_len + first_position   # rope position of each slot
        self.rope = Rope.of(*llm.rotary(slots.view(1, 1, -1).expand(1, 3, -1)))
        self.attend = SlotAttention(llm, cache, self.slot, self.valid)
        self.graph = self.logits = None
        self.use_graph = use_graph and chooser.greedy

    def first(self, logits: torch.Tensor) -> None:
        """The first generated token, from the prompt's last logits [1, 1, V]."""
        self._take(self.chooser(logits))

    def __call__(self) -> torch.Tensor:
        """Feed the current token, choose the next; returns the logits it was chosen from [1, 1, V]."""
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def read(self, start: int, stop: int) -> list[int]:
        """Generated tokens start .. stop - 1 (one copy to the host)."""
        return self.ids[self.prompt_len + start:self.prompt_len + stop, 0].tolist()

    def _take(self, token: torch.Tensor) -> None:
        """`token` [1, 1] is the next input, fed at the current slot (generated token slot - prompt_len)."""
        self.token.copy_(token)
        self.ids.index_copy_(0, self.slot, token)

    def _step(self) -> torch.Tensor:
        self.valid.index_fill_(-1, self.slot, True)
        rope = Rope(self.rope.cos.index_select(1, self.slot), self.rope.sin.index_select(1, self.slot))
        hidden = self.llm.run_layers(self.llm.embed_text(self.token), rope, UND, self.attend)
        logits = self.llm.logits(hidden)
        self.slot.add_(1)
        self._take(self.chooser(logits))
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (lazy inits, autotuning), as CUDA graphs require, then capture one step. The
        warm-up steps' state changes are undone: their cache writes land in slots that stay masked until the real
        steps rewrite them."""
        saved = [t.clone() for t in (self.token, self.slot, self.valid, self.ids)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip((self.token, self.slot, self.valid, self.ids), saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()


def cuda_graphs_usable(llm: LanceLLM) -> bool:
    return llm.device.type == "cuda" and torch.cuda.is_available()
