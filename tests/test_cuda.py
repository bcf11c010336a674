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
