"""Understanding (x2t): prompt packing, one prefill, then token-by-token decoding over a preallocated KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import LLMConfig
from .decode_graph import StaticDecodeStep, cuda_graphs_usable
from .errors import Cancelled, InputError
from .llm import LanceLLM, prefill_splits
from .packing import PackedSequence, pack
from .templates import Text, vit_visual
from .validation import require_float, require_int, require_seed
from .tokenizer import LanceTokenizer


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
    ids: list[int]            # generated ids, stop token included when produced
    logits: torch.Tensor      # [steps, vocab] raw logits of every decode step (fp32, CPU)


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


def decode(llm: LanceLLM, seq: PackedSequence, embeds: torch.Tensor, *, max_new_tokens: int, stop_ids: set[int],
           vocab_limit: int, sampling: SamplingOptions = SamplingOptions(),
           on_token: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None,
           cuda_graph: bool | None = None) -> DecodeResult:
    """Prefill the prompt, then generate up to `max_new_tokens`. Each step reuses the preallocated cache;
    `cuda_graph` (default: on when the model is on CUDA) replays the step as one CUDA graph."""
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    sampling.validate()
    prompt_len = len(seq)
    cache = llm.new_cache(1, prompt_len + max_new_tokens)
    generator = torch.Generator("cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
    with torch.inference_mode():
        hidden = prefill_splits(llm, embeds, seq.positions, seq.splits, seq.gen_mask, cache)
        logits = llm.logits(hidden[:, -1])[0]
        step_fn = None  # built at the second token: a one-token answer needs no (captured) step
        next_pos = int(seq.positions[:, -1].max()) + 1
        ids, all_logits = [], []
        for step in range(max_new_tokens):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled after {step} generated tokens")
            logits = logits.float().cpu()
            all_logits.append(logits)
            token = choose_token(logits, ids, vocab_limit, sampling, generator)
            ids.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop_ids:
                break
            if step + 1 == max_new_tokens:
                break
            if step_fn is None:
                step_fn = StaticDecodeStep(llm, cache, cuda_graphs_usable(llm) if cuda_graph is None else cuda_graph)
                step_fn.mark_prefix(prompt_len)
            logits = step_fn(token, next_pos + step, prompt_len + step)
    return DecodeResult(ids, torch.stack(all_logits))


def choose_token(logits: torch.Tensor, history: list[int], vocab_limit: int, sampling: SamplingOptions,
                 generator: torch.Generator | None) -> int:
    logits = logits.clone()
    logits[vocab_limit:] = float("-inf")  # rows past the tokenizer are untrained padding
    if sampling.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)))
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / sampling.repetition_penalty, picked * sampling.repetition_penalty)
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
