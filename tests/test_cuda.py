"""CUDA checks (the user's case). They run only where CUDA exists: CI has no GPU, so there they are skipped and
reported as skipped; run them on a GPU machine with `pytest tests/test_cuda.py`."""
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


def test_parity_cuda_fp32_understanding(cuda_fp32, golden):
    instruction, question = x2t_request(golden, "x2t_image")
    out = cuda_fp32.understand(golden.input_media("x2t_image"), question, instruction=instruction,
                               resolution="image_256res", max_new_tokens=golden.hyper("x2t_image")["max_new_tokens"],
                               return_logits=True)
    assert out.token_ids == golden.tensors("x2t_image")["out/generated_ids"].tolist()
    assert_close(out.logits, golden.tensors("x2t_image")["out/logits_all_steps"], 2e-4, "cuda fp32 x2t logits")


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
    from lance_model.understanding import (
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
    import lance_model.memory as memory
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
    import lance_model.memory as memory
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
