"""CUDA checks (the user's case). They run only where CUDA exists: CI has no GPU, so there they are skipped and
reported as skipped; run them on a GPU machine with `pytest tests/test_cuda.py`."""
import importlib.util

import pytest
import torch

from tests.helpers import assert_close, prepare, settings_for, x2t_request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_fp32(golden):
    from lance_model import load_lance

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return load_lance(golden.checkpoint, dtype="fp32", device="cuda")


@pytest.fixture(scope="module")
def cuda_bf16(golden):
    from lance_model import load_lance

    return load_lance(golden.checkpoint, dtype="bf16", device="cuda")


def run(pipe, golden, name, **extra):
    settings = settings_for(golden, name, **extra)
    captured = {}
    observer = lambda info: captured.setdefault("v_cond", info.v_cond[0].cpu())
    result = pipe.generate(name, "x", prepare(pipe, golden, name, settings), settings, observer=observer)
    return result, captured["v_cond"]


@pytest.mark.parametrize("name", ["t2i", "image_edit", "i2v"])
def test_parity_cuda_fp32(cuda_fp32, golden, name):
    fx = golden.tensors(name)
    result, v_cond = run(cuda_fp32, golden, name)
    assert_close(v_cond[-fx["denoise/v_cond_step0"].shape[0]:], fx["denoise/v_cond_step0"],
                 golden.tolerance("denoise/v_cond_step0"), f"cuda fp32 {name} v_cond")
    key = "out/latent.1" if "out/latent.1" in fx else "out/latent.0"
    assert_close(result.latents[0].permute(1, 2, 3, 0), fx[key], golden.tolerance(key), f"cuda fp32 {name} {key}")


@pytest.mark.parametrize("name", ["x2t_image", "x2t_video"])
def test_parity_cuda_fp32_understanding(cuda_fp32, golden, name):
    instruction, question = x2t_request(golden, name)
    hp = golden.hyper(name)
    out = cuda_fp32.understand(golden.input_media(name), question, instruction=instruction,
                               resolution=hp["resolution"], max_new_tokens=hp["max_new_tokens"], return_logits=True)
    assert out.token_ids == golden.tensors(name)["out/generated_ids"].tolist()
    assert_close(out.logits, golden.tensors(name)["out/logits_all_steps"], 2e-4, f"cuda fp32 {name} logits")


@pytest.mark.parametrize("name", ["t2i", "image_edit"])
def test_bf16_tracks_fp32(cuda_bf16, golden, name):
    """bf16 is the user's precision: step-0 velocity within 5% of the fp32 reference's range, finite outputs."""
    fx = golden.tensors(name)
    result, v_cond = run(cuda_bf16, golden, name)
    expected = fx["denoise/v_cond_step0"]
    tol = 0.05 * float(expected.abs().max())
    assert_close(v_cond[-expected.shape[0]:], expected, tol, f"cuda bf16 {name} v_cond (5% of range)")
    assert torch.isfinite(result.latents).all() and torch.isfinite(result.frames).all()


def test_bf16_batched_cfg_matches_sequential(cuda_bf16, golden):
    a, _ = run(cuda_bf16, golden, "image_edit", batched_cfg=True, decode=False)
    b, _ = run(cuda_bf16, golden, "image_edit", batched_cfg=False, decode=False)
    tol = 0.05 * float(b.latents.abs().max())
    assert_close(a.latents, b.latents, tol, "cuda bf16 batched vs sequential CFG")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_decode_matches_eager(golden, dtype, request):
    pipe = request.getfixturevalue("cuda_fp32" if dtype == "fp32" else "cuda_bf16")
    from lance_model.tasks.understanding import (
        decode,
        prompt_embeddings,
        understanding_sequence,
    )

    seq = understanding_sequence(pipe.tokenizer, pipe.config, "Describe.", "a red cat", None)
    embeds = prompt_embeddings(pipe.llm, seq, [])
    runs = [decode(pipe.llm, seq, embeds, max_new_tokens=12, stop_ids=set(), vocab_limit=pipe.tokenizer.vocab_limit,
                   cuda_graph=graph, keep_logits=True) for graph in (True, False)]
    assert runs[0].ids == runs[1].ids
    assert_close(runs[0].logits, runs[1].logits, 1e-5 if dtype == "fp32" else 1e-2, f"cuda graph vs eager decode ({dtype})")


# ---------------------------------------------------------------- issue #25: every GPU feature once on a GPU
def greedy_answer(pipe, max_new_tokens: int, cuda_graph: bool):
    from lance_model.tasks.understanding import decode, prompt_embeddings, understanding_sequence

    seq = understanding_sequence(pipe.tokenizer, pipe.config, "Describe.", "a red cat", None)
    return decode(pipe.llm, seq, prompt_embeddings(pipe.llm, seq, []), max_new_tokens=max_new_tokens, stop_ids=set(),
                  vocab_limit=pipe.tokenizer.vocab_limit, cuda_graph=cuda_graph, keep_logits=True)


def test_cuda_devices_resolve_with_their_index(cuda_fp32):
    """`device="cuda"` becomes cuda:N, so every memory query (session.check, first act of every task) works."""
    from lance_model.runtime.memory import Estimate

    assert cuda_fp32.device.index == torch.cuda.current_device()
    cuda_fp32.session.check(Estimate().add("sampling", "KV cache", 1))


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
def test_cuda_graph_decode_of_the_shortest_answers(cuda_fp32, max_new_tokens):
    """The capture's warm-up must stay inside the step's buffers (2 tokens used to write one row past `ids`: a
    device-side assert that kills the CUDA context)."""
    graphed, eager = (greedy_answer(cuda_fp32, max_new_tokens, graph) for graph in (True, False))
    assert graphed.ids == eager.ids
    assert_close(graphed.logits, eager.logits, 1e-5, f"cuda graph vs eager, {max_new_tokens} tokens")
    torch.cuda.synchronize()   # a device-side assert would surface here


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_graph_on_a_second_device(golden):
    """The model on cuda:1 while cuda:0 is current: streams and the capture belong to cuda:1 (else the graph
    records nothing and its replays leave the logits unchanged)."""
    from lance_model import load_lance

    torch.cuda.set_device(0)
    pipe = load_lance(golden.checkpoint, dtype="fp32", device="cuda:1")
    graphed, eager = (greedy_answer(pipe, 6, graph) for graph in (True, False))
    assert graphed.ids == eager.ids
    assert_close(graphed.logits, eager.logits, 1e-5, "cuda:1 graph vs eager")


def test_cuda_stream_equals_resident(golden, cuda_fp32):
    """memory="stream": the copy stream, events and pinned host copies give the resident results bit for bit."""
    from lance_model import load_lance

    streamed = load_lance(golden.checkpoint, dtype="fp32", device="cuda", memory="stream")
    options = dict(width=64, height=64, steps=3, seed=1)
    a, b = streamed.text_to_image("a red cat", **options), cuda_fp32.text_to_image("a red cat", **options)
    assert torch.equal(a.latents, b.latents)
    question = dict(question="What is a cat?", max_new_tokens=8)
    assert streamed.understand(None, **question).token_ids == cuda_fp32.understand(None, **question).token_ids
    streamer = streamed.session.streamer
    assert all(slab.is_pinned() for stream in streamer.experts.values() for slab in stream.slabs)   # in place


@pytest.mark.parametrize("memory", ["stream", "auto"])
def test_cuda_offload_frees_what_the_plan_placed_and_the_next_call_places_it_again(golden, memory):
    """What a host sees of a library-placed model (ComfyUI's patcher sizes it by device_bytes): placement deferred
    to the first call; offload_weights frees at least the reported bytes (the allocator rounds each block up to
    512 bytes, so at most that much more per tensor); the next call places them again with the same result."""
    import gc

    from lance_model import load_lance

    pipe = load_lance(golden.checkpoint, dtype="bf16", device="cuda", memory=memory, defer_placement=True)
    session, device = pipe.session, pipe.session.device
    assert session.device_bytes() == 0 and not any(p.is_cuda for p in pipe.llm.parameters())
    options = dict(width=64, height=64, steps=3, seed=1)
    before = pipe.text_to_image("a red cat", **options)
    session.release_scratch()   # the stores' tensors aside: only weights and slots are counted
    placed = session.device_bytes()
    assert placed == session.device_bytes(planned=True) > 0
    allocated = torch.cuda.memory_allocated(device)
    session.offload_weights()
    gc.collect()
    freed = allocated - torch.cuda.memory_allocated(device)
    tensors = sum(1 for module in session.placed_modules() for _ in [*module.parameters(recurse=False),
                                                                      *module.buffers(recurse=False)])
    assert placed <= freed <= placed + 512 * (tensors + 8), (placed, freed)
    again = pipe.text_to_image("a red cat", **options)
    assert session.weights_placed and torch.equal(again.latents, before.latents)


def test_cuda_stream_slabs_are_unlocked_when_the_model_goes(golden):
    """The page-locked host slabs are registered in place (cudaHostRegister) and unregistered when the model is
    dropped: host memory of an unloaded model goes back to the system."""
    import gc
    import weakref

    from lance_model import load_lance

    streamed = load_lance(golden.checkpoint, dtype="bf16", device="cuda", memory="stream")
    locks = [weakref.ref(lock) for stream in streamed.session.streamer.experts.values() for lock in stream.pinned]
    assert locks and all(lock() is not None for lock in locks)
    del streamed
    gc.collect()
    assert all(lock() is None for lock in locks)


def test_cuda_fp8_storage_computes_in_bf16(golden, cuda_bf16):
    """fp8 weights (understanding expert) dequantized to bf16 per layer: the task runs, finite and close."""
    from lance_model import load_lance

    fp8 = load_lance(golden.checkpoint, dtype="bf16", device="cuda", fp8=("und",))
    options = dict(width=64, height=64, steps=3, seed=1)
    ours, reference = fp8.text_to_image("a red cat", **options), cuda_bf16.text_to_image("a red cat", **options)
    assert torch.isfinite(ours.frames).all()
    mse = float(((ours.frames - reference.frames) ** 2).mean())
    assert mse < 10 ** -3.5, f"fp8 frames off bf16 by mse {mse:.2e} (PSNR gate 35 dB)"


@pytest.mark.parametrize("cap_gib", [8, 12, 16])
def test_cuda_auto_plan_under_a_memory_cap(golden, cap_gib):
    """memory="auto" reads the capped allocator (get_per_process_memory_fraction needs an indexed device): the plan
    is chosen and a generation and an answer run under the cap."""
    from lance_model import load_lance

    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(cap_gib * 2 ** 30 / total, 1.0), device)
    try:
        pipe = load_lance(golden.checkpoint, dtype="bf16", device="cuda", memory="auto")
        assert pipe.plan is not None
        assert torch.isfinite(pipe.text_to_image("a red cat", width=64, height=64, steps=2, seed=1).frames).all()
        assert pipe.understand(None, "What is a cat?", max_new_tokens=4).token_ids
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_cuda_flash_attention_tracks_sdpa(golden, cuda_bf16):
    """attention="flash" (bf16, prefill and denoising blocks) against SDPA: the same step-0 velocity within 5% of
    the fp32 reference's range, as bf16 itself."""
    from lance_model import load_lance

    flash = load_lance(golden.checkpoint, dtype="bf16", device="cuda", attention="flash")
    (_, ours), (_, reference) = run(flash, golden, "t2i"), run(cuda_bf16, golden, "t2i")
    tol = 0.05 * float(golden.tensors("t2i")["denoise/v_cond_step0"].abs().max())
    assert_close(ours, reference, tol, "cuda flash vs sdpa v_cond")


SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=3)


def test_cuda_sampled_choice_reads_nothing_back(cuda_bf16):
    """Top-k, top-p and the repetition penalty run on the device: choosing a token never syncs with the host."""
    from lance_model import SamplingOptions
    from lance_model.runtime.decode_step import TokenChooser

    vocab, limit = cuda_bf16.config.vocab_size, cuda_bf16.tokenizer.vocab_limit
    chooser = TokenChooser(SamplingOptions(**SAMPLED), limit, vocab, cuda_bf16.device)
    logits = torch.randn(1, 1, vocab, device=cuda_bf16.device, dtype=torch.bfloat16)
    torch.cuda.synchronize(cuda_bf16.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = [chooser(logits) for _ in range(4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(0 <= int(token) < limit for token in tokens)


def test_cuda_sampled_understanding_is_seeded(cuda_bf16, golden):
    from lance_model import SamplingOptions

    instruction, question = x2t_request(golden, "x2t_image")
    runs = [cuda_bf16.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                                 resolution="image_256res", max_new_tokens=12, sampling=SamplingOptions(**SAMPLED),
                                 on_token=lambda _: None) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].text == runs[1].text
    assert all(0 <= t < cuda_bf16.tokenizer.vocab_limit for t in runs[0].token_ids)


def test_cuda_streamed_decode_ends_at_a_stop_token_inside_a_chunk(cuda_fp32, golden, monkeypatch):
    """Greedy on CUDA (the CUDA-graph step) with on_token: ids read a chunk at a time, the stop token inside the
    first chunk ends ids, logits and text there."""
    import math

    from lance_model.runtime.decode_step import DecodeStep
    from lance_model.tasks.understanding import STREAM_CHUNK_TOKENS

    reads, read = [], DecodeStep.read
    monkeypatch.setattr(DecodeStep, "read", lambda self, start, stop: reads.append(stop) or read(self, start, stop))
    instruction, question = x2t_request(golden, "x2t_image")
    fx = golden.tensors("x2t_image")
    ids = fx["out/generated_ids"].tolist()
    end = ids.index(ids[1]) + 1
    seen = []
    out = cuda_fp32.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                               resolution="image_256res", max_new_tokens=len(ids), on_token=seen.append,
                               stop_tokens=(cuda_fp32.tokenizer.hf.convert_ids_to_tokens(ids[1]),), return_logits=True)
    assert out.token_ids == ids[:end] and len(reads) == math.ceil(end / STREAM_CHUNK_TOKENS)
    assert_close(out.logits, fx["out/logits_all_steps"][:end], 2e-4, "cuda fp32 streamed x2t logits")
    assert seen[-1] == cuda_fp32.tokenizer.decode(ids[:end - 1]) and out.text == seen[-1].strip()
    reads.clear()
    full = cuda_fp32.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                                resolution="image_256res", max_new_tokens=len(ids), on_token=seen.append)
    assert full.token_ids == ids and len(reads) == math.ceil(len(ids) / STREAM_CHUNK_TOKENS)


# ---------------------------------------------------------------- the compiled denoising step (#25)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_step_cuda_equals_eager_and_compiles_once(golden, dtype, request):
    """load_lance(compile=True) on the GPU: the eager step's latents (fp32: the manifest's latent tolerance; bf16:
    5% of their range, fusion rounds differently) and one compilation for prompts of several lengths."""
    from lance_model import load_lance

    eager = request.getfixturevalue("cuda_fp32" if dtype == "fp32" else "cuda_bf16")
    compiled = load_lance(golden.checkpoint, dtype=dtype, device="cuda", compile=True)
    torch._dynamo.reset()   # compiled code is shared by every LLM in the process: start from none
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompts = [("a cat", ""), ("a red cat on a green mat", ""), ("dog", "blurry, dark, noisy, washed out"),
               ("a red cat sitting on a big green mat in the sun, photographed from above", "")]
    for prompt, negative in prompts:
        options = dict(width=64, height=64, steps=3, seed=1, decode=False, negative_prompt=negative)
        ours = compiled.text_to_image(prompt, **options).latents
        reference = eager.text_to_image(prompt, **options).latents
        tol = golden.tolerance("out/latent.0") if dtype == "fp32" else 0.05 * float(reference.abs().max())
        assert_close(ours, reference, tol, f"cuda {dtype} compiled vs eager step ({prompt!r})")
    assert compiled.llm.compiles_steps, "the compiled step fell back to eager"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1


# ---------------------------------------------------------------- the VAE under a host's partial load and a memory cap
@pytest.fixture
def cuda_capped(golden):
    """A private bf16 pipeline on an indexed CUDA device (these tests move its weights and cap the process memory);
    the cap is lifted afterwards."""
    from lance_model import load_lance
    device = torch.device("cuda", torch.cuda.current_device())
    pipe = load_lance(golden.checkpoint, dtype="bf16", device=str(device))
    yield pipe, device
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()


def cap_memory(device: torch.device, extra_bytes: int) -> None:
    """Let the process hold at most `extra_bytes` more than it reserves now (cached blocks are returned first)."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(device) + extra_bytes) / total),
                                               device)


def spy_decode(vae_class, calls: list, before=None):
    """LanceVAE.decode recording whether the VAE was tiled and whether torch ran out of memory; `before()` runs
    first (e.g. a cap)."""
    original = vae_class.decode

    def decode(vae, latents):
        calls.append(vae.tiling_enabled)
        if before is not None:
            before()
        try:
            return original(vae, latents)
        except torch.OutOfMemoryError:
            calls.append("out of memory")
            raise
    return decode


def test_vae_decode_in_ram_under_a_memory_cap_retries_tiled(cuda_capped, monkeypatch):
    """A host's partial load left the decoder in RAM (as ComfyUI leaves plain layers that do not fit): it visits the
    GPU for the decode only and counts in the estimate. Capped between the tiled and the untiled decode's peak, the
    untiled decode runs out of memory for real and the tiled retry gives the tiled pixels; the memory is freed."""
    import lance_model.runtime.memory as memory
    pipe, device = cuda_capped
    vae, session = pipe.vae, pipe.session
    side = pipe.config.constants.max_latent_size
    latents = torch.randn(1, vae.z_dim, 1, side, side, generator=torch.Generator().manual_seed(0))
    expected, peaks = {}, {}
    for tiled in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        expected[tiled] = pipe.decode_latents(latents, tiled=tiled)
        peaks[tiled] = torch.cuda.max_memory_allocated(device) - start
    assert peaks[True] < peaks[False], f"tiled decode peak {peaks[True]} not below untiled {peaks[False]}"
    vae.module.decoder.to("cpu")
    decoder_bytes = sum(t.numel() * t.element_size() for t in [*vae.module.decoder.parameters(),
                                                               *vae.module.decoder.buffers()])
    assert session.stage_weights(vae.module) == decoder_bytes
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)   # no up-front refusal: a real OOM
    calls = []
    monkeypatch.setattr(type(vae), "decode", spy_decode(type(vae), calls))
    start = torch.cuda.memory_allocated(device)
    cap_memory(device, decoder_bytes + (peaks[True] + peaks[False]) // 2)
    frames = pipe.decode_latents(latents)
    assert calls == [False, "out of memory", True]
    assert_close(frames, expected[True], 1e-3, "capped decode vs tiled decode")
    assert {t.device.type for t in vae.module.decoder.parameters()} == {"cpu"}   # back where the host left it
    assert torch.cuda.memory_allocated(device) <= start + (1 << 20)


def test_decode_out_of_memory_after_sampling_keeps_the_latents_and_frees_memory(cuda_capped, monkeypatch):
    """Sampling done, the device has nothing left to spare (a cap at what the process holds): the untiled decode
    and its tiled retry run out of memory for real -> DecodeOutOfMemory carrying the sampled latents; what the run
    held is freed, and the pipeline decodes them once memory is back."""
    import lance_model.runtime.memory as memory
    from lance_model import DecodeOutOfMemory
    pipe, device = cuda_capped
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)   # no up-front refusal: a real OOM
    calls = []
    monkeypatch.setattr(type(pipe.vae), "decode", spy_decode(type(pipe.vae), calls, lambda: cap_memory(device, 0)))
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(device)
    side = 32 * pipe.vae.spatial_factor
    with pytest.raises(DecodeOutOfMemory, match="the latents are kept") as error:
        pipe.text_to_image("a red cat", width=side, height=side, steps=2, seed=0)
    assert calls == [False, "out of memory", True, "out of memory"]
    result = error.value.result
    assert result.frames is None and torch.isfinite(result.latents).all()
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert torch.cuda.memory_allocated(device) <= start + (1 << 20)
    monkeypatch.undo()
    frames = pipe.decode_latents(result.latents)
    assert frames.shape == (1, 1, side, side, 3) and torch.isfinite(frames).all()


class HostCastingLinear(torch.nn.Linear):
    """A Linear whose weight may stay in host memory and is copied to the input's device per call, as ComfyUI's
    ops do under a partial (low-VRAM) load."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.device)
        return torch.nn.functional.linear(x, self.weight.to(x.device), bias)


class HostCastingOps:   # no RMSNorm: the library's own (it casts a weight left elsewhere itself)
    Linear = HostCastingLinear
    Embedding = torch.nn.Embedding


def test_cuda_understanding_under_a_partial_load_decodes_eagerly(golden, cuda_fp32, caplog):
    """Half the LLM's layers left in host memory (cast in per call): greedy decoding must not capture a graph
    (copies from pageable memory are refused while a stream captures) and gives the resident answer; forcing a
    capture there fails and falls back to eager steps with one log line."""
    import logging

    from lance_model import load_lance

    partial = load_lance(golden.checkpoint, dtype="fp32", device="cuda", operations=HostCastingOps)
    layers = partial.llm.language_model.model.layers
    for layer in layers[: len(layers) // 2 or 1]:
        layer.to("cpu")
    from lance_model.runtime.decode_step import cuda_graphs_usable

    assert not cuda_graphs_usable(partial.llm)
    question = dict(question="What is a cat?", max_new_tokens=8)
    assert partial.understand(None, **question).token_ids == cuda_fp32.understand(None, **question).token_ids
    with caplog.at_level(logging.WARNING, logger="lance_model.runtime.decode_step"):
        forced = greedy_answer(partial, 6, cuda_graph=True)
    assert forced.ids == greedy_answer(cuda_fp32, 6, cuda_graph=False).ids
    assert any("capture of the decode step failed" in r.getMessage() for r in caplog.records)


def test_decode_out_of_memory_facts_carry_no_library_advice(cuda_capped, monkeypatch):
    """A real CUDA out-of-memory in the decode after sampling: DecodeOutOfMemory.facts names what ran out (the CUDA
    error's first line, untiled and tiled) without load_lance advice, for a host's own wording (the nodes')."""
    import lance_model.runtime.memory as memory
    from lance_model import DecodeOutOfMemory

    pipe, device = cuda_capped
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)   # no up-front refusal: a real OOM
    monkeypatch.setattr(type(pipe.vae), "decode", spy_decode(type(pipe.vae), [], lambda: cap_memory(device, 0)))
    side = 32 * pipe.vae.spatial_factor
    try:
        with pytest.raises(DecodeOutOfMemory) as error:
            pipe.text_to_image("a red cat", width=side, height=side, steps=2, seed=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    facts = error.value.facts
    assert facts.startswith(f"sampling finished, but decoding its latents ran out of memory on {device}, untiled (")
    assert "CUDA out of memory" in facts and ") and tiled (" in facts
    assert "this error's" not in facts and "memory='" not in facts and "memory mode" not in facts
