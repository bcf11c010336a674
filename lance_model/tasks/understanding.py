"""Understanding (x2t): prompt packing, one prefill, then token-by-token decoding over a preallocated KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import Cancelled, InputError
from ..io.validation import require_float, require_int, require_seed
from ..nn.config import LLMConfig
from ..nn.llm import LanceLLM, prefill_splits
from ..nn.tokenizer import LanceTokenizer
from ..runtime.decode_step import DecodeStep, TokenChooser, cuda_graphs_usable
from .packing import PackedSequence, pack
from .templates import Text, vit_visual


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 = greedy (the reference default); top_p 0 keeps only the most likely token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        require_float(self.temperature, "temperature", minimum=0.0, maximum=100.0)
        require_float(self.top_p, "top_p", 0.0, 1.0)
        require_int(self.top_k, "top_k", minimum=0)
        require_float(self.repetition_penalty, "repetition_penalty", above=0.0, maximum=100.0)
        if self.seed is not None:
            require_seed(self.seed, "sampling seed")


@dataclass
class DecodeResult:
    ids: list[int]                  # generated ids, stop token included when produced
    logits: torch.Tensor | None     # [steps, vocab] raw logits of every decode step (fp32, CPU), when asked for


def understanding_sequence(tokenizer: LanceTokenizer, cfg: LLMConfig, instruction: str, question: str,
                           vit_grid: tuple[int, int, int] | None, history: list[Text] = ()) -> PackedSequence:
    """system = instruction; user = [history texts] [media] [question]; the prompt ends after `assistant\\n`."""
    user = list(history)
    if vit_grid is not None:
        user.append(vit_visual(vit_grid, cfg.spatial_merge_size))
    if question:
        tokenizer.encode_user_text(question, "question")
        user.append(Text(question))
    tokenizer.encode_user_text(instruction, "instruction")
    return pack(tokenizer, cfg, instruction, user, [], close_assistant=False, shift_positions=False)


def prompt_embeddings(llm: LanceLLM, seq: PackedSequence, vit_embeds: list[torch.Tensor]) -> torch.Tensor:
    embeds = llm.embed_text(seq.ids).clone()
    for block, vit in zip(seq.blocks_with_role("vit"), vit_embeds):
        embeds[block.payload] = vit.to(embeds)
    return embeds


STOP_CHECK_TOKENS = 16   # generated ids reach the host this many at a time (each read is a device sync) ...
STREAM_CHUNK_TOKENS = 4  # ... or this many when they are streamed: new text every ~0.2 s at 0.05 s a token


def decode(llm: LanceLLM, seq: PackedSequence, embeds: torch.Tensor, *, max_new_tokens: int, stop_ids: set[int],
           vocab_limit: int, sampling: SamplingOptions = SamplingOptions(),
           on_ids: Callable[[list[int]], None] | None = None, cancel: Callable[[], bool] | None = None,
           cuda_graph: bool | None = None, keep_logits: bool = False) -> DecodeResult:
    """Prefill the prompt, then generate up to `max_new_tokens`, the tokens chosen on the device (decode_step.py).
    The ids reach the host a chunk at a time: STREAM_CHUNK_TOKENS with `on_ids` (called with each chunk's ids),
    else STOP_CHECK_TOKENS. A stop token is thus found up to a chunk late; what follows it is dropped, so the ids
    (and logits) end at it all the same. `cuda_graph` (default: on CUDA, greedy) replays the step as one CUDA
    graph; `keep_logits` returns every step's logits."""
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    sampling.validate()
    chunk = STOP_CHECK_TOKENS if on_ids is None else STREAM_CHUNK_TOKENS
    prompt_len = len(seq)
    cache = llm.new_cache(1, prompt_len + max_new_tokens)
    chooser = TokenChooser(sampling, vocab_limit, llm.config.vocab_size, llm.device)
    with torch.inference_mode():
        hidden = prefill_splits(llm, embeds, seq.positions, seq.splits, seq.gen_mask, cache)
        logits = llm.logits(hidden[:, -1:])
        step = DecodeStep(llm, cache, prompt_len, int(seq.positions[:, -1].max()) + 1, chooser,
                          cuda_graphs_usable(llm) if cuda_graph is None else cuda_graph)
        step.first(logits)
        kept = [logits[0, 0].to("cpu", copy=True)] if keep_logits else []
        ids, chosen = [], 1
        while True:
            if chosen - len(ids) >= chunk or chosen == max_new_tokens:
                new = up_to_stop(step.read(len(ids), chosen), stop_ids)
                ids += new
                if on_ids is not None:
                    on_ids(new)
                if ids[-1] in stop_ids or len(ids) == max_new_tokens:
                    return DecodeResult(ids, torch.stack(kept[:len(ids)]) if keep_logits else None)
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled after {chosen} generated tokens")
            logits = step()
            chosen += 1
            if keep_logits:
                kept.append(logits[0, 0].to("cpu", copy=True))   # a graph replay overwrites its logits


def up_to_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """`ids` up to and including the first stop id."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids
