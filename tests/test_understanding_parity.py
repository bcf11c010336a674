"""x2t_image / x2t_video against the official fixtures: packed prompt, ViT embeddings, logits and greedy ids."""
import math

import pytest
import torch

from tests.helpers import assert_close, x2t_request

X2T_TASKS = ["x2t_image", "x2t_video"]


@pytest.fixture(scope="module")
def answers(pipe, golden):
    out = {}
    for name in golden.tasks(*X2T_TASKS):
        hp = golden.hyper(name)
        instruction, question = x2t_request(golden, name)
        out[name] = pipe.understand(golden.input_media(name), question, instruction=instruction,
                                    resolution=hp["resolution"], max_new_tokens=hp["max_new_tokens"], return_logits=True)
    return out


@pytest.mark.parametrize("name", X2T_TASKS)
def test_parity_x2t_packed_prompt(pipe, golden, name):
    from lance_model.tasks.understanding import understanding_sequence

    fx = golden.tensors(name)
    instruction, question = x2t_request(golden, name)
    grid = tuple(fx["packed/vit_video_grid_thw"][0].tolist())
    seq = understanding_sequence(pipe.tokenizer, pipe.config, instruction, question, grid)
    n = len(seq)  # the fixture also packs the training answer after the prompt
    assert torch.equal(seq.ids, fx["packed/packed_text_ids"][:n])
    assert torch.equal(seq.codes, fx["packed/sample_modality"][:n])
    vit = seq.blocks_with_role("vit")[0]
    assert torch.equal(torch.arange(vit.payload.start, vit.payload.stop), fx["packed/packed_vit_token_indexes"])
    assert int(fx["packed/ce_loss_indexes"][0]) == n - 1, "the prompt must end where the reference starts predicting"


@pytest.mark.parametrize("name", X2T_TASKS)
def test_parity_x2t_logits_and_ids(golden, answers, name):
    fx, result = golden.tensors(name), answers[name]
    assert result.token_ids == fx["out/generated_ids"].tolist()
    assert_close(result.logits[:1], fx["out/logits_first"], golden.tolerance("out/logits_first"), f"{name} logits_first")
    assert_close(result.logits, fx["out/logits_all_steps"], golden.tolerance("out/logits_all_steps"), f"{name} logits_all_steps")


def test_x2t_text_is_decoded_ids(pipe, answers):
    for result in answers.values():
        stop = pipe.tokenizer.special.im_end
        assert result.text == pipe.tokenizer.decode([t for t in result.token_ids if t != stop]).strip()
        assert result.context.turns[-1].response == result.text


def test_streaming_callback_sees_growing_text(pipe, golden):
    """on_token gets the text so far once per chunk of STREAM_CHUNK_TOKENS ids, the last time the whole answer."""
    from lance_model.tasks.understanding import STREAM_CHUNK_TOKENS
    seen = []
    instruction, question = x2t_request(golden, "x2t_image")
    result = pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                             resolution="image_256res", max_new_tokens=2 * STREAM_CHUNK_TOKENS, on_token=seen.append)
    chunks = math.ceil(len(result.token_ids) / STREAM_CHUNK_TOKENS)
    assert chunks <= len(seen) <= chunks + 1
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))
    assert seen[-1].strip() == result.text


def test_cancel_stops_decoding_and_model_stays_usable(pipe, golden):
    from lance_model import Cancelled

    instruction, question = x2t_request(golden, "x2t_image")
    calls = []
    with pytest.raises(Cancelled):
        pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                        resolution="image_256res", max_new_tokens=8, cancel=lambda: calls.append(1) or len(calls) > 2)
    again = pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                            resolution="image_256res", max_new_tokens=8)
    assert again.token_ids == golden.tensors("x2t_image")["out/generated_ids"].tolist()


def test_sampling_is_seeded(pipe):
    from lance_model import SamplingOptions

    options = SamplingOptions(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=3)
    first = pipe.enhance_prompt("a cat", max_new_tokens=6, sampling=options)
    assert first == pipe.enhance_prompt("a cat", max_new_tokens=6, sampling=options)


def test_stop_tokens(pipe, golden):
    instruction, question = x2t_request(golden, "x2t_image")
    ids = golden.tensors("x2t_image")["out/generated_ids"].tolist()
    stop = pipe.tokenizer.hf.convert_ids_to_tokens(ids[1])
    out = pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                          resolution="image_256res", max_new_tokens=8, stop_tokens=(stop,))
    assert out.token_ids == ids[:2]
    from lance_model import InputError
    with pytest.raises(InputError, match="stop_tokens"):
        pipe.understand(golden.input_media("x2t_image"), question, stop_tokens=("not a token at all",))


def test_decode_step_stores_each_token_at_its_slot_only(pipe):
    """The device-side decode step stores the fed token's key/value at the slot tensor's position, leaves the
    prompt's slots alone, and keeps the chosen token in `ids`."""
    from lance_model import SamplingOptions
    from lance_model.runtime.decode_step import DecodeStep, TokenChooser

    cache = pipe.llm.new_cache(1, 8)
    for keys in cache.keys:
        keys.fill_(1.0)
    chooser = TokenChooser(SamplingOptions(), pipe.tokenizer.vocab_limit, pipe.config.vocab_size, pipe.device)
    step = DecodeStep(pipe.llm, cache, prompt_len=5, first_position=5, chooser=chooser, use_graph=False)
    with torch.inference_mode():
        step.first(torch.zeros(1, 1, pipe.config.vocab_size))
        logits = step()
    assert all(bool((keys[:, :, :5] == 1.0).all()) and not bool((keys[:, :, 5] == 1.0).all()) for keys in cache.keys)
    assert all(bool((keys[:, :, 6:] == 1.0).all()) for keys in cache.keys)
    assert step.read(0, 2) == [0, int(logits[0, 0, :pipe.tokenizer.vocab_limit].argmax())]


def test_logits_only_when_asked_and_the_same_ids_with_or_without_a_callback(pipe, golden):
    instruction, question = x2t_request(golden, "x2t_image")
    media = golden.input_media("x2t_image")
    plain = pipe.understand(media, question, instruction=instruction, max_new_tokens=40)
    streamed = pipe.understand(media, question, instruction=instruction, max_new_tokens=40, on_token=lambda _: None,
                               return_logits=True)
    assert plain.logits is None and streamed.logits.shape[0] == len(streamed.token_ids)
    assert plain.token_ids == streamed.token_ids and plain.text == streamed.text


def test_chunked_prompt_prefill_gives_the_official_answers(pipe, golden, monkeypatch):
    """A prompt prefilled in small chunks (llm.PREFILL_CHUNK_TOKENS) gives the official ids and logits."""
    from lance_model.nn import llm
    monkeypatch.setattr(llm, "PREFILL_CHUNK_TOKENS", 5)
    for name in golden.tasks(*X2T_TASKS):
        hp, fx = golden.hyper(name), golden.tensors(name)
        instruction, question = x2t_request(golden, name)
        result = pipe.understand(golden.input_media(name), question, instruction=instruction,
                                 resolution=hp["resolution"], max_new_tokens=hp["max_new_tokens"], return_logits=True)
        assert result.token_ids == fx["out/generated_ids"].tolist()
        assert_close(result.logits, fx["out/logits_all_steps"], golden.tolerance("out/logits_all_steps"),
                     f"{name} chunked prefill logits")
