"""One whole understanding run: the prompt's up-front checks and memory estimate, decoding, the answer text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError
from ..io.inputs import unit_frames
from ..io.validation import require_bool, require_callable, require_int
from ..nn.tokenizer import TextStream
from ..runtime.memory import Estimate, forward_activation_bytes, kv_cache_bytes
from ..runtime.session import LanceSession
from .context import LanceContext, Turn
from .packing import PackedSequence
from .prepare import TextRequest
from .understanding import SamplingOptions, decode, prompt_embeddings

MAX_NEW_TOKENS = 16384   # the KV cache is preallocated for prompt + max_new_tokens


@dataclass
class UnderstandingResult:
    text: str
    token_ids: list[int]
    logits: torch.Tensor | None    # [steps, vocab] raw logits per decode step (when asked for: return_logits)
    context: LanceContext


def answer(session: LanceSession, request: TextRequest, *, max_new_tokens: int, sampling: SamplingOptions | None,
           on_token: Callable[[str], None] | None, cancel: Callable[[], bool] | None,
           stop_tokens: tuple[str, ...] = (), return_logits: bool = False) -> UnderstandingResult:
    """Decode the answer to a prepared question and append the turn to its conversation."""
    require_bool(return_logits, "return_logits")
    text, ids, logits = generate_text(session, request.seq, request.vit_embeds, max_new_tokens=max_new_tokens,
                                      sampling=sampling, on_token=on_token, cancel=cancel, stop_tokens=stop_tokens,
                                      keep_logits=return_logits)
    media = unit_frames(request.frames) if request.frames is not None else None
    turn = Turn("x2t_video" if request.is_video else "x2t_image", request.question, text, media)
    return UnderstandingResult(text, ids, logits, (request.context or LanceContext(session.model_id)).append(turn))


def generate_text(session: LanceSession, seq: PackedSequence, vit_embeds: list[torch.Tensor], *, max_new_tokens: int,
                  sampling: SamplingOptions | None, on_token: Callable[[str], None] | None = None,
                  cancel: Callable[[], bool] | None = None, stop_tokens: tuple[str, ...] = (),
                  keep_logits: bool = False) -> tuple[str, list[int], torch.Tensor | None]:
    """(text without stop tokens, generated ids, logits per step). Decoding stops at <|im_end|> or any of
    `stop_tokens` (token strings of the vocabulary); `on_token` gets the text so far every few tokens (once per
    chunk of ids read from the device, understanding.STREAM_CHUNK_TOKENS), the last time with the whole answer."""
    require_callable(on_token, "on_token")
    check_request(session, seq, max_new_tokens, sampling, stop_tokens)
    tokenizer = session.tokenizer
    stop_ids = {tokenizer.special.im_end} | {tokenizer.token_id(token, "stop_tokens") for token in stop_tokens}
    stream = TextStream(tokenizer)

    def stream_text(ids: list[int]) -> None:
        on_token(stream.push([t for t in ids if t not in stop_ids]))
    with session.running(session.llm, cancel):
        out = decode(session.llm, seq, prompt_embeddings(session.llm, seq, vit_embeds), max_new_tokens=max_new_tokens,
                     stop_ids=stop_ids, vocab_limit=tokenizer.vocab_limit, sampling=sampling or SamplingOptions(),
                     on_ids=stream_text if on_token is not None else None, cancel=cancel, keep_logits=keep_logits)
    text = tokenizer.decode([t for t in out.ids if t not in stop_ids])
    if on_token is not None and text != stream.text:
        on_token(text)   # an answer cut off inside a character: its held-back end, as the answer shows it
    return text.strip(), out.ids, out.logits


def check_request(session: LanceSession, seq: PackedSequence, max_new_tokens, sampling, stop_tokens) -> None:
    """A bounded token budget (the KV cache is preallocated for all of it) that fits the model's positions and
    the device's memory."""
    require_int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    prompt_len = len(seq)
    limit = session.config.max_positions
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise InputError(f"max_new_tokens {max_new_tokens} + the prompt's {prompt_len} tokens exceed the model's "
                         f"{limit} positions (max_position_embeddings)")
    if sampling is not None and not isinstance(sampling, SamplingOptions):
        raise InputError(f"sampling must be SamplingOptions or None, got {type(sampling).__name__}")
    if not isinstance(stop_tokens, (tuple, list)):
        raise InputError(f"stop_tokens must be a tuple of token strings, got {type(stop_tokens).__name__}")
    longest = max((s.length for s in seq.splits), default=prompt_len)
    session.check(Estimate()
                  .add("text decoding", "KV cache", kv_cache_bytes(session.config, 1, prompt_len + max_new_tokens,
                                                                   session.dtype))
                  .add("text decoding", "activations", forward_activation_bytes(session.config, longest, session.dtype))
                  .add("text decoding", "LLM weights", session.stage_weights(session.llm)))
