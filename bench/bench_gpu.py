"""Every GPU figure of the speed and VRAM issues in one command, on the release configuration with random weights
built in host memory (no 16 GB file write):

    python bench/bench_gpu.py [--budget-gib 8,12,16,24] [--skip rows,profile,budgets] [--compile]
    python bench/bench_gpu.py --smoke      # the same code at toy sizes on the CPU (a test runs it)

Prints: the machine (bf16 GEMM and SDPA TFLOP/s, device copy TB/s), the weights per group, every row of the speed
table (figure, goal, floor, ratio) with its peak memory, a profile of a t2i run (GPU busy vs wall, GEMM /
attention / other), and per memory budget the VRAM plan it picks, each task's peak memory and time (the budget is
enforced with torch.cuda.set_per_process_memory_fraction, so one large GPU measures every card size). The last
line is always `ops per layer-step N, ops per layer-token M`: top-level aten ops of one decoder layer in a guided
denoising step and in a decode step, counted eagerly on the CPU with the tiny checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, copy_bandwidth, seconds  # noqa: E402
from bench.random_release import REAL_LLM, REAL_VIT, RELEASE_VAE  # noqa: E402
from lance_model import GenerationSettings, LancePipeline, SamplingOptions, load_lance  # noqa: E402
from lance_model.attention import Attention  # noqa: E402
from lance_model.checkpoint import resolve_release  # noqa: E402
from lance_model.config import LLMConfig  # noqa: E402
from lance_model.llm import LanceLLM  # noqa: E402
from lance_model.loader import place  # noqa: E402
from lance_model.memory import GIB, readable  # noqa: E402
from lance_model.session import LanceSession  # noqa: E402
from lance_model.tokenizer import LanceTokenizer  # noqa: E402
from lance_model.vae import LanceVAE, _architecture_from_weights, _build_module, convert_wan_vae_keys  # noqa: E402
from lance_model.vit import LanceViT, load_vit_config  # noqa: E402
from lance_model.vram_plan import DEVICE_MARGIN, WeightBytes, candidates, choose_plan, working_reserve  # noqa: E402

PROMPT = "A red fox standing in a snowy birch forest at dawn, soft golden light, photorealistic, detailed fur."


@dataclass(frozen=True)
class Scale:
    """Request sizes of one run: the release's (GPU) or toy ones (--smoke)."""

    image: int = 768
    large_image: int = 1024
    video: tuple[int, int] = (480, 848)
    frames: int = 61
    long_frames: int = 121
    steps: int = 30
    tokens: int = 128


SMOKE = Scale(image=64, large_image=96, video=(64, 64), frames=5, long_frames=9, steps=3, tokens=8)
# figure -> (goal, floor) of the speed issue, seconds (tokens/s for the decode)
GOALS = {"t2i 768^2, 30 steps": (1.3, 1.15), "guided step 768^2": (0.042, 0.040), "unguided step 768^2": (0.022, 0.020),
         "t2i 1024^2, 30 steps": (2.3, None), "image_edit 768^2, 30 steps": (1.6, None),
         "t2v 480x848x61, 30 steps": (30.0, None), "t2v 480x848x121 guided step": (3.2, 3.14),
         "x2t decode (tokens/s)": (500.0, 690.0)}


# ---------------------------------------------------------------- the model, with random weights
def _init(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights in a realistic range: norm scales 1, biases 0, the rest N(0, 0.02)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith(("weight", "gamma")) or name.endswith("gamma"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False)


def release_architecture(dtype: torch.dtype):
    """(llm, vit, vae) modules of the release configuration on the meta device (no memory): the LLM and ViT at
    release size with the tiny checkpoint's ids, the Wan2.2 VAE at release width."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from lance_model.checkpoint import load_torch_state_dict
    raw = json.loads((GOLDEN / "checkpoint" / "Lance_3B" / "llm_config.json").read_text())
    vit_raw = json.loads((GOLDEN / "checkpoint" / "Qwen2.5-VL-ViT" / "config.json").read_text())
    vit_config_file = Path(torch.hub.get_dir()) / "lance_bench_vit.json"
    vit_config_file.parent.mkdir(parents=True, exist_ok=True)
    vit_config_file.write_text(json.dumps({**vit_raw, **REAL_VIT}))
    tiny_vae = convert_wan_vae_keys(load_torch_state_dict(GOLDEN / "checkpoint" / "Wan2.2_VAE.pth"))
    with torch.device("meta"):
        llm = LanceLLM(LLMConfig.from_dict({**raw, **REAL_LLM}), attention=Attention("auto"))
        vit = Qwen2_5_VisionTransformerPretrainedModel(load_vit_config(vit_config_file))
        vae = _build_module({**_architecture_from_weights(tiny_vae, GOLDEN), **RELEASE_VAE})
    return llm.to(dtype), vit.to(dtype), vae.to(dtype)


def random_modules(smoke: bool, dtype: torch.dtype):
    """(llm, vit, vae) in host memory: the release configuration (smoke: the tiny checkpoint's) with random
    weights. Each measured pipeline places its own copy (one resident copy, then one per budget)."""
    device = torch.device("cpu")
    if smoke:
        pipe = load_lance(GOLDEN / "checkpoint", dtype=dtype, device=device)
        return pipe.llm, pipe.vit, pipe.vae
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
    llm, vit, vae = (_init(module.to_empty(device=device)) for module in release_architecture(dtype))
    vit.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(vit.config).to(device)   # its frequencies are computed
    return llm, LanceViT(vit), LanceVAE(vae)


def pipeline(modules, device: torch.device, memory: str = "resident", budget: int | None = None) -> LancePipeline:
    """A pipeline over a copy of the host-memory modules: all on the device (resident), or placed by the VRAM
    plan for `budget` (auto)."""
    llm, vit, vae = (copy.deepcopy(m) for m in (modules[0], modules[1].module, modules[2].module))
    vit, vae = LanceViT(vit), LanceVAE(vae)
    paths = resolve_release(GOLDEN / "checkpoint")
    tokenizer = LanceTokenizer(paths.lance_dir, llm.config)
    plan = streamer = None
    if memory == "auto":
        plan, streamer = place("auto", llm, vit, vae, device, budget, (), False)
    else:
        for module in (llm, vit.module, vae.module):
            module.to(device)
    return LancePipeline(LanceSession(paths, llm, tokenizer, vit, vae, memory, device, {}, plan, streamer))


# ---------------------------------------------------------------- measurements
def peak(device: torch.device, fn) -> tuple[float, str]:
    """(seconds, peak allocated) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    took = seconds(fn, device)
    memory = readable(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else "n/a (CPU)"
    return took, memory


def per_step(run, steps: int, device: torch.device) -> float:
    """Seconds per denoising step: (a (steps + 1)-step run - a 1-step run) / steps, prefill reused."""
    run(1)
    return (seconds(lambda: run(steps + 1), device) - seconds(lambda: run(1), device)) / steps


def rows(pipe: LancePipeline, scale: Scale, device: torch.device) -> list[tuple[str, float, str]]:
    s, v = scale, scale.video
    full = dict(steps=s.steps, seed=42)
    image = torch.rand(1, s.image, s.image, 3, generator=torch.Generator().manual_seed(0))
    t2i = lambda size, **kw: pipe.text_to_image(PROMPT, width=size, height=size, **{**full, **kw})
    step = lambda **kw: lambda n: t2i(s.image, steps=n, decode=False, **kw)
    out = [("t2i 768^2, 30 steps", *peak(device, lambda: t2i(s.image)))]
    out.append(("guided step 768^2", per_step(step(cfg_interval=(0.0, 1.0)), 5, device), ""))
    out.append(("unguided step 768^2", per_step(step(cfg_scale=1.0), 5, device), ""))
    out.append(("t2i 1024^2, 30 steps", *peak(device, lambda: t2i(s.large_image))))
    out.append(("image_edit 768^2, 30 steps", *peak(device, lambda: pipe.edit_image(
        image, "Make the sky a warm sunset orange", resolution=f"image_{s.image if s.image in (256, 512, 768) else 256}res",
        **full))))
    out.append(("t2v 480x848x61, 30 steps", *peak(device, lambda: pipe.text_to_video(
        "A small boat sails across a calm lake at sunset.", width=v[1], height=v[0], num_frames=s.frames, **full))))
    long_step = lambda n: pipe.text_to_video("A small boat sails across a calm lake at sunset.", width=v[1], height=v[0],
                                             num_frames=s.long_frames, steps=n, decode=False, cfg_interval=(0.0, 1.0))
    out.append(("t2v 480x848x121 guided step", per_step(long_step, 2, device), ""))
    few, many = 8, 8 + s.tokens
    answer = lambda n: pipe.understand(image, "Describe the image in detail.", max_new_tokens=n,
                                       sampling=SamplingOptions())
    answer(few)
    took = seconds(lambda: answer(many), device) - seconds(lambda: answer(few), device)
    out.append(("x2t decode (tokens/s)", s.tokens / took, ""))
    return out


def print_rows(results) -> None:
    print(f"{'figure':34} {'measured':>11} {'goal':>9} {'floor':>9} {'goal/measured':>14}  peak memory")
    for name, value, memory in results:
        goal, floor = GOALS[name]
        tokens = name.startswith("x2t")
        ratio = value / goal if tokens else goal / value
        unit = "tok/s" if tokens else "s"
        print(f"{name:34} {value:9.3f} {unit:5} {goal:9.3f} {floor if floor else '':>9} {ratio:13.2f}x  {memory}")


def machine(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        print("machine: CPU (no GEMM/SDPA peak measured in smoke mode)")
        return
    a, b = torch.randn(8192, 8192, device=device, dtype=dtype), torch.randn(8192, 8192, device=device, dtype=dtype)
    gemm = 2 * 8192 ** 3 / min(seconds(lambda: a @ b, device) for _ in range(5))
    q = torch.randn(2, 16, 2400, 128, device=device, dtype=dtype)
    k = torch.randn(2, 2, 2400, 128, device=device, dtype=dtype)
    sdpa = 4 * 2 * 16 * 2400 * 2400 * 128 / min(
        seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True), device)
        for _ in range(5))
    print(f"machine: {torch.cuda.get_device_name(device)}, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s, SDPA "
          f"{sdpa / 1e12:.0f} TFLOP/s, device copy {copy_bandwidth(device) / 1e12:.2f} TB/s")


def profile(pipe: LancePipeline, scale: Scale, device: torch.device) -> None:
    """GPU busy vs wall over a t2i run, and the shares of GEMM, attention and the rest."""
    if device.type != "cuda":
        print("profile: CUDA only")
        return
    from torch.profiler import ProfilerActivity
    run = lambda: pipe.text_to_image(PROMPT, width=scale.image, height=scale.image, steps=scale.steps, seed=42)
    run()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        wall = seconds(run, device)
    shares = {"GEMM": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        busy = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e6
        if busy <= 0 or event.key.startswith("aten::") or event.key.startswith("cuda"):
            continue
        name = event.key.lower()
        kind = ("GEMM" if any(w in name for w in ("gemm", "cutlass", "xmma", "matmul", "sm90")) else
                "attention" if any(w in name for w in ("flash", "fmha", "attention", "cudnn")) else "other")
        shares[kind] += busy
    total = sum(shares.values())
    print(f"profile t2i {scale.image}^2 x {scale.steps}: wall {wall:.2f} s, GPU busy {total:.2f} s "
          f"({total / wall:.0%}); " + ", ".join(f"{k} {v:.2f} s ({v / max(total, 1e-9):.0%})" for k, v in shares.items()))


def budgets(modules, scale: Scale, device: torch.device, gib: list[float], smoke: bool) -> None:
    """Per memory budget: the plan and each task's time and peak memory (smoke: budgets sized from the tiny
    model's own weights, one per plan, no allocator cap)."""
    sizes = WeightBytes.of(modules[0], modules[1].module, modules[2].module)
    print(f"weights: understanding expert {readable(sizes.und)}, generation expert {readable(sizes.gen)}, "
          f"shared {readable(sizes.shared)}, ViT {readable(sizes.vit)}, VAE {readable(sizes.vae)}")
    if smoke:
        llm, vae = modules[0], modules[2]
        work = working_reserve(llm.config, int(vae.module.config.decoder_base_dim), llm.dtype)
        limits = [sizes.device_bytes(plan) + work for plan in candidates()]
    else:
        limits = [int(g * GIB) for g in gib]
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    for limit in limits:
        try:
            if total:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0), device)
            # on CUDA the plan reads the capped allocator itself (memory.available_bytes), as a user's load would
            budget_tasks(pipeline(modules, device, "auto", None if total else limit), scale, device, limit)
        except Exception as exc:  # noqa: BLE001 - a budget that does not fit is a result, not a crash
            print(f"  budget {readable(limit)}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            if total:
                torch.cuda.set_per_process_memory_fraction(1.0, device)


def budget_tasks(pipe: LancePipeline, scale: Scale, device: torch.device, limit: int) -> None:
    v = scale.video
    print(f"budget {readable(limit)}: {pipe.plan.describe()}", flush=True)
    for name, fn in (
            ("t2i", lambda: pipe.text_to_image(PROMPT, width=scale.image, height=scale.image, steps=scale.steps,
                                               seed=42)),
            ("t2v 121 frames, 2 steps", lambda: pipe.text_to_video(
                "A boat at sunset", width=v[1], height=v[0], num_frames=scale.long_frames, steps=2)),
            ("x2t 32 tokens", lambda: pipe.understand(None, "What is a fox?", max_new_tokens=32))):
        took, memory = peak(device, fn)
        print(f"  {name:26} {took:8.2f} s   peak {memory}", flush=True)


def release_plans(gib: list[float]) -> None:
    """The release's weights per group in bf16 (built on the meta device: no memory) and the plan each budget
    picks with the working reserve of a 768^2 image (vram_plan.py's arithmetic; the budgets section runs them)."""
    llm, vit, vae = release_architecture(torch.bfloat16)
    sizes = WeightBytes.of(llm, vit, vae)
    work = working_reserve(llm.config, RELEASE_VAE["decoder_base_dim"], torch.bfloat16)
    print(f"release weights (bf16): understanding expert {readable(sizes.und)}, generation expert "
          f"{readable(sizes.gen)}, shared {readable(sizes.shared)} (LLM {readable(sizes.und + sizes.gen + sizes.shared)}), "
          f"ViT {readable(sizes.vit)}, VAE {readable(sizes.vae)}; all {readable(sizes.device_bytes(candidates()[0]))}; "
          f"working reserve of a 768^2 image {readable(work)}")
    for g in gib:
        budget = int(g * GIB) - DEVICE_MARGIN
        try:
            plan = choose_plan(budget, sizes, work)
            print(f"  {g:g} GiB card: {plan.describe()} ({readable(sizes.device_bytes(plan))} of weights on the device)")
        except Exception as exc:  # noqa: BLE001 - a card too small is a result
            print(f"  {g:g} GiB card: {str(exc).splitlines()[0]}")


# ---------------------------------------------------------------- op counts (eager, CPU, the tiny checkpoint)
def top_level_aten_ops(fn) -> int:
    """aten ops of a call that no other aten op called (the ops a forward issues itself)."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def op_counts() -> tuple[float, float]:
    """(ops per layer per guided step, ops per layer per decode token): differences of two runs, so the prefill
    and everything else outside the steps / tokens cancels."""
    pipe = load_lance(GOLDEN / "checkpoint", dtype="fp32", device="cpu")
    layers = pipe.config.num_layers
    settings = lambda steps: GenerationSettings(steps=steps, cfg_interval=(0.0, 1.0), decode=False, seed=1)
    t2i = lambda steps: pipe.text_to_image("a red cat", width=64, height=64, settings=settings(steps))
    t2i(1)
    step = (top_level_aten_ops(lambda: t2i(6)) - top_level_aten_ops(lambda: t2i(2))) / (4 * layers)
    counts = {}

    def understand(tokens):
        counts[tokens] = len(pipe.understand(None, "What is a cat?", max_new_tokens=tokens).token_ids)
    first, second = top_level_aten_ops(lambda: understand(4)), top_level_aten_ops(lambda: understand(12))
    token = (second - first) / ((counts[12] - counts[4]) * layers)
    return step, token


def run_sections(modules, scale: Scale, device: torch.device, skip: set[str], gib: list[float], smoke: bool,
                 compiled: bool) -> None:
    if not {"rows", "profile"} <= skip:
        resident(modules, scale, device, skip, compiled)
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the resident copy is gone: the budgets measure their own placements only
    if "budgets" not in skip:
        guarded(lambda: budgets(modules, scale, device, gib, smoke))


def resident(modules, scale: Scale, device: torch.device, skip: set[str], compiled: bool) -> None:
    pipe = pipeline(modules, device)
    if compiled:
        pipe.llm.compile_steps()
        print("denoising steps compiled (torch.compile)")
    if "rows" not in skip:
        guarded(lambda: print_rows(rows(pipe, scale, device)))
    if "profile" not in skip:
        guarded(lambda: profile(pipe, scale, device))


def guarded(run) -> None:
    try:
        run()
    except Exception:  # noqa: BLE001 - one failing section must not hide the others
        traceback.print_exc()
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (a test runs this)")
    parser.add_argument("--budget-gib", default="8,12,16,24")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: rows, profile, budgets")
    parser.add_argument("--compile", action="store_true", help="the speed rows with load_lance(compile=True)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU path", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    scale = SMOKE if args.smoke else Scale()
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {'smoke (CPU, toy sizes)' if args.smoke else 'release configuration'}, {dtype}")
    machine(device, dtype)
    gib = [float(g) for g in args.budget_gib.split(",")]
    release_plans(gib)
    modules = random_modules(args.smoke, dtype)
    print(f"model built in {time.perf_counter() - started:.0f} s", flush=True)
    run_sections(modules, scale, device, skip, gib, args.smoke, args.compile)
    step, token = op_counts()
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"ops per layer-step {step:.1f}, ops per layer-token {token:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
