"""Streamed and sampled text decoding: generated ids reach the host a chunk at a time, the streamed text is
detokenized incrementally (a small window of ids per chunk, an incomplete UTF-8 character held back), and sampling
chooses tokens on the device without reading anything back (the draws as before on the CPU)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lance_model import SamplingOptions
from lance_model.nn.tokenizer import REPLACEMENT_CHARACTER, TextStream
from lance_model.tasks.understanding import STOP_CHECK_TOKENS, STREAM_CHUNK_TOKENS, DecodeResult
from tests.helpers import x2t_request

MULTI_BYTE_TEXT = "😀 a cat 世界 🦜 ñ"
LONG_QUESTION = "Tell me a long story about a cat."
LONG_ANSWER = 64
WINDOW_IDS = TextStream.CONTEXT_IDS + TextStream.MAX_HELD_IDS + STREAM_CHUNK_TOKENS   # most ids one push decodes


def cuts_inside_characters(tokenizer, ids):
    """Positions inside `ids` that cut a character in two (the text of the ids before ends incomplete)."""
    return [i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(REPLACEMENT_CHARACTER)]


def count_decoded_ids(monkeypatch, tokenizer):
    """The number of ids of each tokenizer.decode call, recorded from now on."""
    sizes, decode = [], tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids: sizes.append(len(ids)) or decode(ids))
    return sizes


# ---------------------------------------------------------------- TextStream (tokenizer.py)
def test_the_golden_tokenizer_splits_the_test_text_inside_characters(pipe):
    ids = pipe.tokenizer.encode(MULTI_BYTE_TEXT)
    assert cuts_inside_characters(pipe.tokenizer, ids), "the test text must have a character over several tokens"


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5])
def test_text_stream_never_shows_an_incomplete_character(pipe, chunk):
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode(MULTI_BYTE_TEXT)
    stream, shown = TextStream(tokenizer), []
    for start in range(0, len(ids), chunk):
        shown.append(stream.push(ids[start:start + chunk]))
    assert shown[-1] == tokenizer.decode(ids) == MULTI_BYTE_TEXT
    assert all(REPLACEMENT_CHARACTER not in text and MULTI_BYTE_TEXT.startswith(text) for text in shown)


def test_text_stream_holds_back_a_split_character_until_it_is_complete(pipe):
    """Id by id, the stream shows the longest decoded prefix that ends in a whole character."""
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode(MULTI_BYTE_TEXT)
    stream, complete = TextStream(tokenizer), ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        complete = complete if text.endswith(REPLACEMENT_CHARACTER) else text
        assert stream.push(ids[i - 1:i]) == complete


def test_text_stream_decodes_a_small_window_per_push(pipe, monkeypatch):
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode(" ".join([MULTI_BYTE_TEXT] * 20))
    stream = TextStream(tokenizer)
    sizes = count_decoded_ids(monkeypatch, tokenizer)
    for start in range(0, len(ids), STREAM_CHUNK_TOKENS):
        text = stream.push(ids[start:start + STREAM_CHUNK_TOKENS])
    assert len(ids) > 4 * WINDOW_IDS and max(sizes) <= WINDOW_IDS
    assert text == tokenizer.decode(ids)


def test_text_stream_shows_invalid_bytes_after_a_few_ids(pipe):
    """Ids that never complete a character (lead bytes only) are shown as U+FFFD once MAX_HELD_IDS are held,
    as the full decode shows them: the window stays small whatever the model writes."""
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode(MULTI_BYTE_TEXT)
    lead = ids[cuts_inside_characters(tokenizer, ids)[0] - 1]
    stream = TextStream(tokenizer)
    shown = [stream.push([lead]) for _ in range(TextStream.MAX_HELD_IDS)]
    assert shown[:-1] == [""] * (TextStream.MAX_HELD_IDS - 1)
    assert shown[-1] == tokenizer.decode([lead] * TextStream.MAX_HELD_IDS)


# ---------------------------------------------------------------- streamed answers
@pytest.fixture
def read_count(monkeypatch):
    """How often the decode loop reads generated ids from the device (each read is a sync on CUDA)."""
    from lance_model.runtime.decode_step import DecodeStep
    count, read = [0], DecodeStep.read

    def counting_read(self, start, stop):
        count[0] += 1
        return read(self, start, stop)
    monkeypatch.setattr(DecodeStep, "read", counting_read)
    return count


def test_streamed_answer_reads_the_ids_a_chunk_at_a_time(pipe, read_count):
    seen = []
    result = pipe.understand(None, LONG_QUESTION, max_new_tokens=LONG_ANSWER, on_token=seen.append)
    n = len(result.token_ids)
    assert n > STREAM_CHUNK_TOKENS, "the answer must span several chunks"
    assert read_count[0] == math.ceil(n / STREAM_CHUNK_TOKENS)
    assert read_count[0] <= len(seen) <= read_count[0] + 1 and seen[-1].strip() == result.text
    read_count[0] = 0
    assert pipe.understand(None, LONG_QUESTION, max_new_tokens=LONG_ANSWER).token_ids == result.token_ids
    assert read_count[0] == math.ceil(n / STOP_CHECK_TOKENS)


def test_streamed_answer_detokenizes_a_small_window_per_chunk(pipe, monkeypatch):
    sizes = count_decoded_ids(monkeypatch, pipe.tokenizer)
    seen = []
    result = pipe.understand(None, LONG_QUESTION, max_new_tokens=LONG_ANSWER, on_token=seen.append)
    n = len(result.token_ids)
    assert n > 2 * WINDOW_IDS, "the answer must be longer than the window"
    assert max(sizes[:-1]) <= WINDOW_IDS and sizes[-1] <= n   # the last call: the whole answer, once
    assert seen[-1].strip() == result.text


def test_stop_token_inside_a_streamed_chunk_ends_the_answer_there(pipe, golden):
    """The chunk read holds ids after the stop token: they are dropped from the ids, logits, and text."""
    instruction, question = x2t_request(golden, "x2t_image")
    fx = golden.tensors("x2t_image")
    ids = fx["out/generated_ids"].tolist()
    stop = ids[1]
    end = ids.index(stop) + 1
    assert end < min(STREAM_CHUNK_TOKENS, len(ids)), "the stop token must sit inside the first chunk"
    seen = []
    out = pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                          resolution="image_256res", max_new_tokens=len(ids), on_token=seen.append,
                          stop_tokens=(pipe.tokenizer.hf.convert_ids_to_tokens(stop),), return_logits=True)
    assert out.token_ids == ids[:end]
    assert torch.equal(out.logits, pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                                                   resolution="image_256res", max_new_tokens=len(ids),
                                                   return_logits=True).logits[:end])
    assert seen[-1] == pipe.tokenizer.decode(ids[:end - 1]) and out.text == seen[-1].strip()


def stream_fake_answer(pipe, monkeypatch, answer: list[int]) -> tuple[list[str], str]:
    """(the texts streamed, the answer's text) for a decode loop that generates `answer` (text_generation.decode
    replaced: the tiny model's own answers hold no multi-byte character)."""
    from lance_model.tasks import text_generation

    def fake_decode(llm, seq, embeds, *, on_ids, **_):
        for start in range(0, len(answer), STREAM_CHUNK_TOKENS):
            on_ids(answer[start:start + STREAM_CHUNK_TOKENS])
        return DecodeResult(answer, None)
    monkeypatch.setattr(text_generation, "decode", fake_decode)
    seen = []
    return seen, pipe.understand(None, "q", max_new_tokens=len(answer), on_token=seen.append).text


def test_streamed_text_waits_for_a_split_character(pipe, monkeypatch):
    """An answer whose chunks cut characters in two streams only whole characters; one cut off inside a character
    by max_new_tokens ends with the text the answer itself shows."""
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode(MULTI_BYTE_TEXT)
    cuts = cuts_inside_characters(tokenizer, ids)
    assert any(i % STREAM_CHUNK_TOKENS == 0 for i in cuts), "a chunk must end inside a character"
    seen, text = stream_fake_answer(pipe, monkeypatch, ids)
    assert all(REPLACEMENT_CHARACTER not in shown for shown in seen) and seen[-1] == MULTI_BYTE_TEXT == text
    cut_off = ids[:cuts[-1]]
    seen, text = stream_fake_answer(pipe, monkeypatch, cut_off)
    assert all(REPLACEMENT_CHARACTER not in shown for shown in seen[:-1])
    assert seen[-1] == tokenizer.decode(cut_off) and seen[-1].endswith(REPLACEMENT_CHARACTER)
    assert text == seen[-1].strip()


# ---------------------------------------------------------------- sampling (decode_step.TokenChooser)
SAMPLING = [SamplingOptions(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=3),
            SamplingOptions(temperature=1.3, top_k=5, seed=11),
            SamplingOptions(temperature=0.7, top_p=0.5, seed=0),
            SamplingOptions(temperature=1.0, seed=7),
            SamplingOptions(repetition_penalty=1.5, seed=1)]


def reference_draws(options, logits, vocab_limit):
    """The sampling code as it was (boolean-mask assignment, torch.multinomial): what the draws must stay."""
    generator = torch.Generator().manual_seed(options.seed)
    seen, tokens = torch.zeros(logits.shape[-1], dtype=torch.bool), []
    for row in logits:
        scores = row.clone()
        scores[vocab_limit:] = float("-inf")
        if options.repetition_penalty != 1.0:
            penalty = options.repetition_penalty
            scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
        if options.temperature == 0:
            token = scores.argmax()
        else:
            scores = scores / options.temperature
            if options.top_k:
                kth = torch.topk(scores, min(options.top_k, scores.numel())).values[-1]
                scores[scores < kth] = float("-inf")
            probs = torch.softmax(scores, dim=-1)
            if options.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                sorted_probs[sorted_probs.cumsum(0) - sorted_probs > options.top_p] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            token = torch.multinomial(probs / probs.sum(), 1, generator=generator)[0]
        seen[token] = True
        tokens.append(int(token))
    return tokens


@pytest.mark.parametrize("options", SAMPLING)
def test_sampled_tokens_are_those_of_the_reference_sampling_code(options):
    from lance_model.runtime.decode_step import TokenChooser
    vocab, vocab_limit = 300, 290
    logits = torch.randn(40, vocab, generator=torch.Generator().manual_seed(5)) * 3
    chooser = TokenChooser(options, vocab_limit, vocab, torch.device("cpu"))
    assert [int(chooser(row.view(1, 1, -1))) for row in logits] == reference_draws(options, logits, vocab_limit)


class SyncingOps(TorchDispatchMode):
    """Records the ops that read a device tensor back on the host (a sync on CUDA): scalar reads, nonzero,
    boolean-mask indexing, multinomial (its argument check reads the probabilities)."""

    SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.multinomial"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = any(isinstance(arg, (list, tuple)) and any(getattr(i, "dtype", None) == torch.bool for i in arg)
                         for arg in args)
        if name in self.SYNCING or (name.startswith("aten.index") and bool_index):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", SAMPLING)
def test_sampling_rehearsal_reads_nothing_back(options):
    """The ops of a sampled choice, recorded on the CPU: none of them would make the host wait for a GPU."""
    from lance_model.runtime.decode_step import TokenChooser
    chooser = TokenChooser(options, 290, 300, torch.device("cpu"))
    with SyncingOps() as ops:
        for _ in range(3):
            chooser(torch.randn(1, 1, 300))
    assert ops.seen == []
