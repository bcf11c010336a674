"""The compiled denoising step (load_lance(compile=True): torch.compile of the decoder stack, inductor on the CPU
here) gives the eager step's results, and where compilation is unavailable it says so once and runs eagerly."""
from __future__ import annotations

import logging

import torch

from lance_model import load_lance

SMALL = dict(width=64, height=64, steps=3, seed=1, decode=False)


def test_compiled_step_equals_eager(pipe, golden):
    compiled = load_lance(golden.checkpoint, dtype="fp32", device="cpu", compile=True)
    for run in (lambda p: p.text_to_image("a red cat", **SMALL),
                lambda p: p.text_to_image("a red cat", batch_size=2, **SMALL)):
        ours, reference = run(compiled).latents, run(pipe).latents
        error = (ours - reference).abs().max().item()
        print(f"[compile] compiled vs eager step: max_abs={error:.3e}")
        assert error <= 1e-5
    assert compiled.llm._step_layers is not None, "the compiled step fell back to eager"


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
