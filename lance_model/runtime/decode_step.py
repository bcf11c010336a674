"""Token-by-token decoding: one generated token per call, with static shapes and all of its state on the device.

A step embeds the current token, runs the layers against the preallocated KV cache (the new key/value stored at
the slot tensor's position, attention over the whole capacity under a validity mask), and chooses the next token
on the device (TokenChooser): only the token id ever needs to reach the host, and only when the caller reads it.
With greedy decoding on CUDA, when every LLM weight sits on the execution device, the whole step is captured once
as a CUDA graph and replayed per token (device_backend.py: on the CPU the same capture and replay path runs
eagerly, which the rehearsal tests check); otherwise, or when a capture fails, the step runs eagerly.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import first_line
from ..nn.kv_cache import KVCache
from ..nn.llm import UND, LanceLLM
from ..nn.positions import Rope
from .device_backend import HostBackend, backend_for
from .devices import indexed

log = logging.getLogger(__name__)

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
                 use_graph: bool, backend: HostBackend | None = None):
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
        self.backend = backend or backend_for(device)
        self.graph = None
        self.use_graph = use_graph and chooser.greedy

    def first(self, logits: torch.Tensor) -> None:
        """The first generated token, from the prompt's last logits [1, 1, V]."""
        self._take(self.chooser(logits))

    def __call__(self) -> torch.Tensor:
        """Feed the current token, choose the next; returns the logits it was chosen from [1, 1, V]."""
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is None:
            return self._step()
        return self.graph.replay()

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
        """One step as a graph (device_backend.capture: its warm-up steps and the capture leave the step's state
        as it was; their cache writes land in the slot the first replay rewrites). A capture the device refuses
        (a weight a host still copies in per call, say) leaves the steps eager, with one log line."""
        try:
            self.graph = self.backend.capture(self._step, [self.token, self.slot, self.valid, self.ids])
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            log.warning("CUDA graph capture of the decode step failed (%s): decoding runs eagerly", first_line(exc))
            self.use_graph = False


# What a host that manages weights itself leaves on a module while it casts them in per call (ComfyUI's ops:
# weight/bias functions such as low-VRAM LoRA patches; `_v`, a Dynamic VRAM weight buffer that may be evicted
# between calls). A captured graph would bake in one call's copies, and copies from pageable host memory are not
# even allowed while a stream captures.
HOST_CAST_MARKERS = ("weight_function", "bias_function")
HOST_BUFFER_MARKER = "_v"


def static_weights(module: nn.Module, device: torch.device) -> bool:
    """True when every weight and buffer of `module` already sits on `device` and no host casts it per call: the
    precondition of replaying a captured graph over it."""
    device = indexed(device)
    if any(hasattr(sub, HOST_BUFFER_MARKER) or any(getattr(sub, name, None) for name in HOST_CAST_MARKERS)
           for sub in module.modules()):
        return False
    return all(tensor.device == device for tensor in (*module.parameters(), *module.buffers()))


def cuda_graphs_usable(llm: LanceLLM) -> bool:
    """A CUDA device, and the LLM's weights all resident there (not under a host's partial or dynamic loading,
    not streamed)."""
    return llm.device.type == "cuda" and torch.cuda.is_available() and static_weights(llm, llm.device)
