"""The compiled denoising step (load_lance(compile=True): torch.compile of the decoder stack, inductor on the CPU
here) gives the eager step's results, compiles once per request layout whatever the prompts' lengths, stays
cancellable, leaves nothing behind when dropped, and where compilation is unavailable it says so once and runs
eagerly."""
from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from lance_model import Cancelled, load_lance

SMALL = dict(width=64, height=64, steps=3, seed=1, decode=False)
# prompts of five lengths; negative prompts longer and shorter than their prompt change which CFG branch is longest
PROMPTS = [dict(prompt="a cat"),
           dict(prompt="a red cat on a mat"),
           dict(prompt="dog", negative_prompt="blurry, dark, noisy, low quality, washed out colours"),
           dict(prompt="a red cat sitting on a big green mat in the sun", negative_prompt="blurry"),
           dict(prompt="a very long prompt about a cat that keeps going on and on about the cat and its mat")]


@pytest.fixture(scope="module")
def compiled(golden):
    """One compiled pipeline for the module (compiling on two CPU cores takes a while)."""
    return load_lance(golden.checkpoint, dtype="fp32", device="cpu", compile=True)


def compilations() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_step_equals_eager(compiled, pipe):
    for run in (lambda p: p.text_to_image("a red cat", **SMALL),
                lambda p: p.text_to_image("a red cat", batch_size=2, **SMALL)):
        ours, reference = run(compiled).latents, run(pipe).latents
        error = (ours - reference).abs().max().item()
        print(f"[compile] compiled vs eager step: max_abs={error:.3e}")
        assert error <= 1e-5
    assert compiled.llm.compiles_steps, "the compiled step fell back to eager"


@pytest.mark.parametrize("layout", [dict(), dict(batch_size=2)], ids=["one_sample", "two_samples"])
def test_one_compilation_per_layout_whatever_the_prompt_length(compiled, pipe, layout):
    torch._dynamo.reset()   # compiled code is shared by every LLM in the process: start from none
    before = compilations()
    for prompt in PROMPTS:
        ours = compiled.text_to_image(**SMALL, **layout, **prompt).latents
        reference = pipe.text_to_image(**SMALL, **layout, **prompt).latents
        assert (ours - reference).abs().max().item() <= 1e-5, prompt
    assert compilations() - before == 1
    assert compiled.llm.compiles_steps, "the compiled step fell back to eager"


def test_cancel_inside_a_compiled_step_and_usable_afterwards(compiled):
    reference = compiled.text_to_image("a cat", **SMALL).latents
    polls = []
    compiled.text_to_image("a cat", cancel=lambda: polls.append(1) and False, **SMALL)
    before = compilations()
    # the last poll of a run comes from inside its last denoising step (the sampler polls before each step)
    with pytest.raises(Cancelled, match="LLM forward"):
        compiled.text_to_image("a cat", cancel=cancel_from(len(polls)), **SMALL)
    again = compiled.text_to_image("a cat", cancel=lambda: False, **SMALL).latents
    assert torch.equal(again, reference)
    assert compilations() == before, "a call's cancel hooks made the compiled step recompile"
    assert compiled.llm.compiles_steps, "the compiled step fell back to eager"


def cancel_from(poll: int):
    """A cancel callable that says yes from its `poll`-th call on."""
    calls = []
    return lambda: calls.append(1) or len(calls) >= poll


def test_dropped_compiled_pipeline_is_freed_without_garbage_collection(golden):
    dropped = load_lance(golden.checkpoint, dtype="fp32", device="cpu", compile=True)
    dropped.text_to_image("a cat", **SMALL)
    assert dropped.llm.compiles_steps, "the compiled step fell back to eager"
    llm, pipeline = weakref.ref(dropped.llm), weakref.ref(dropped)
    gc.collect()
    gc.disable()
    try:
        del dropped
        assert pipeline() is None and llm() is None, "a reference cycle (or dynamo's caches) keeps the LLM alive"
    finally:
        gc.enable()


def test_compile_falls_back_to_eager_with_one_log_line(pipe, golden, monkeypatch, caplog):
    def unavailable(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", unavailable)
    fallback = load_lance(golden.checkpoint, dtype="fp32", device="cpu", compile=True)
    with caplog.at_level(logging.WARNING):
        first = fallback.text_to_image("a red cat", **SMALL).latents
        second = fallback.text_to_image("a red cat", **SMALL).latents
    messages = [r.getMessage() for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    reference = pipe.text_to_image("a red cat", **SMALL).latents
    assert torch.equal(first, reference) and torch.equal(second, reference)
