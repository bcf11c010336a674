"""Every GPU figure of the speed and VRAM issues, on the release configuration with random weights initialised on
the GPU (seconds; no file, no CPU initialisation), in two parts that each fit a borrowed GPU (estimated well under
5 minutes on an H100 each, so one can be rerun within the loan):

    python bench/bench_gpu.py --part speed     # machine peaks, the speed table, a profile of a t2i run, op counts
    python bench/bench_gpu.py --part budgets   # per --budget-gib (default 8,12,16,24): plan, each task's time/peak
    python bench/bench_gpu.py                  # --part all: both, one after the other
    python bench/bench_gpu.py --smoke [--part speed|budgets|all]   # the same code at toy sizes on the CPU (tested)

speed: the machine (bf16 GEMM and SDPA TFLOP/s, device copy TB/s), every row of the speed table (figure, goal,
floor, ratio, peak memory; a task row times one run after a one-step warm-up of the same request, a per-step row
the difference of two step counts), a profile of a t2i run (GPU busy vs wall; GEMM, attention, other), and
`ops per layer-step N, ops per layer-token M` (top-level aten ops of one decoder layer in a guided denoising step
and in a decode step, counted eagerly on the CPU with the tiny checkpoint). `--compile` compiles the steps first
(one compilation per request layout: minutes more; run it as a call of its own, with --skip for what it needs not).
budgets: the release's weights per group and the plan each card size picks (arithmetic), then per budget a fresh
placement of the random model by the VRAM plan (memory="auto"), under an allocator cap of that size
(torch.cuda.set_per_process_memory_fraction, so one large GPU measures every card size), with one run of each
task (t2i, a 121-frame t2v with one guided step and its decode, an x2t answer about an image), then the swap
ComfyUI makes when another model needs the room: the bytes Lance's patcher reports against those freed, and the
seconds to offload the plan and to place it again.

Every row and task runs in its own try: a failure prints its first line and a short traceback, the rest still
runs. `--skip a,b` skips the rows, tasks and sections (machine, profile, ops, plans) whose names start with one of
the words (`--skip t2v` drops the three video measurements). The last lines are the total seconds and, when the
speed part ran, the op counts.

Every figure is also written as JSON, rewritten after each measurement so a run cut short keeps what it measured:
to `--json PATH`, by default `$OUT/bench_gpu_<part>.json` when $OUT is set (the device machine's folder that comes
back), else `out/bench_gpu_<part>.json` in the repository (git-ignored); `--smoke` adds `_smoke` to the name.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, REPO, copy_bandwidth, cuda_device, seconds  # noqa: E402
from bench.random_release import REAL_LLM, REAL_VIT, RELEASE_VAE  # noqa: E402
from lance_model import GenerationSettings, LancePipeline, SamplingOptions, load_lance  # noqa: E402
from lance_model.nn.attention import Attention  # noqa: E402
from lance_model.nn.checkpoint import load_torch_state_dict, resolve_release  # noqa: E402
from lance_model.nn.config import LLMConfig  # noqa: E402
from lance_model.errors import first_line  # noqa: E402
from lance_model.nn.llm import LanceLLM  # noqa: E402
from lance_model.runtime.loader import prepare_plan  # noqa: E402
from lance_model.runtime.memory import GIB, readable  # noqa: E402
from lance_model.runtime.session import LanceSession  # noqa: E402
from lance_model.nn.tokenizer import LanceTokenizer  # noqa: E402
from lance_model.nn.vae import LanceVAE, _architecture_from_weights, _build_module, convert_wan_vae_keys  # noqa: E402
from lance_model.nn.vit import LanceViT, load_vit_config  # noqa: E402
from lance_model.runtime.vram_plan import (DEVICE_MARGIN, STREAM_AHEAD, WeightBytes, candidates, choose_plan,  # noqa: E402
                                   working_reserve)

PROMPT = "A red fox standing in a snowy birch forest at dawn, soft golden light, photorealistic, detailed fur."
VIDEO_PROMPT = "A small boat sails across a calm lake at sunset."
PARTS = ("speed", "budgets")


@dataclass(frozen=True)
class Scale:
    """Request sizes of one run: the release's (GPU) or toy ones (--smoke)."""

    image: int = 768
    large_image: int = 1024
    video: tuple[int, int] = (480, 848)
    frames: int = 61
    long_frames: int = 121
    steps: int = 30
    tokens: int = 128          # decode row: tokens timed (the difference of two answers)
    answer_tokens: int = 32    # budgets: the x2t answer


SMOKE = Scale(image=64, large_image=96, video=(64, 64), frames=5, long_frames=9, steps=3, tokens=32, answer_tokens=8)
# figure -> (goal, floor) of the speed issue, seconds (tokens/s for the decode)
GOALS = {"t2i 768^2, 30 steps": (1.3, 1.15), "guided step 768^2": (0.042, 0.040), "unguided step 768^2": (0.022, 0.020),
         "t2i 1024^2, 30 steps": (2.3, None), "image_edit 768^2, 30 steps": (1.6, None),
         "x2t decode (tokens/s)": (500.0, 690.0), "t2v 480x848x61, 30 steps": (30.0, None),
         "t2v 480x848x121 guided step": (3.2, 3.14)}


# ---------------------------------------------------------------- the model, with random weights
@dataclass
class Weights:
    """The LLM, ViT and VAE of a model, as a pipeline takes them."""

    llm: LanceLLM
    vit: LanceViT
    vae: LanceVAE

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.llm, self.vit.module, self.vae.module

    def sizes(self) -> WeightBytes:
        return WeightBytes.of(*self.modules)

    def to(self, device: torch.device) -> "Weights":
        for module in self.modules:
            module.to(device)
        return self

    def shallow_copy(self) -> "Weights":
        """New modules over the same parameter storage. A placement rebinds each parameter of its modules (to the
        device, to fp8, to pinned host memory) and never writes into one, so one host copy serves every budget
        (no second 15 GB host copy per budget)."""
        llm, vit, vae = (_sharing_parameters(m) for m in self.modules)
        return Weights(llm, LanceViT(vit), LanceVAE(vae))


def _sharing_parameters(module: torch.nn.Module) -> torch.nn.Module:
    shared = {id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, shared)


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


def architecture(release: bool, dtype: torch.dtype):
    """(llm, vit, vae) modules on the meta device (no memory), with the tiny checkpoint's ids: at release size
    (the LLM and ViT of bench/random_release.py, the Wan2.2 VAE at release width), or the tiny checkpoint's own
    sizes (--smoke)."""
    from lance_model.nn.qwen_vision import Qwen2_5_VisionTransformerPretrainedModel
    llm_raw = json.loads((GOLDEN / "checkpoint" / "Lance_3B" / "llm_config.json").read_text())
    vit_raw = json.loads((GOLDEN / "checkpoint" / "Qwen2.5-VL-ViT" / "config.json").read_text())
    vae_arch = _architecture_from_weights(
        convert_wan_vae_keys(load_torch_state_dict(GOLDEN / "checkpoint" / "Wan2.2_VAE.pth")), GOLDEN)
    if release:
        llm_raw, vit_raw, vae_arch = {**llm_raw, **REAL_LLM}, {**vit_raw, **REAL_VIT}, {**vae_arch, **RELEASE_VAE}
    else:   # enough layers that streaming an expert saves memory, so every plan is a distinct budget
        llm_raw = {**llm_raw, "num_hidden_layers": max(llm_raw["num_hidden_layers"], STREAM_AHEAD + 2)}
    with tempfile.TemporaryDirectory() as folder:   # the ViT config is read from a file, as a release has it
        vit_config = Path(folder) / "config.json"
        vit_config.write_text(json.dumps(vit_raw))
        with torch.device("meta"):
            llm = LanceLLM(LLMConfig.from_dict(llm_raw), attention=Attention("auto"))
            vit = Qwen2_5_VisionTransformerPretrainedModel(load_vit_config(vit_config))
            vae = _build_module(vae_arch)
    return llm.to(dtype), vit.to(dtype), vae.to(dtype)


def random_weights(release: bool, dtype: torch.dtype, device: torch.device) -> Weights:
    """The architecture with random weights, allocated and initialised on `device` (on a GPU: seconds for the
    release, where normal_ on the CPU takes minutes)."""
    from lance_model.nn.qwen_vision import vision_rotary
    torch.manual_seed(0)
    llm, vit, vae = (_init(module.to_empty(device=device)) for module in architecture(release, dtype))
    vit.rotary_pos_emb = vision_rotary(vit.config).to(device)   # its frequencies are computed
    return Weights(llm, LanceViT(vit), LanceVAE(vae))


def pipeline(weights: Weights, device: torch.device, memory: str = "resident",
             budget: int | None = None) -> LancePipeline:
    """A pipeline over these modules (placed in place): all on the device (resident), or placed by a VRAM plan
    (loader.prepare_plan, then the session places the weights; auto: the plan for `budget`; stream; the modules
    must be in host memory)."""
    paths = resolve_release(GOLDEN / "checkpoint")
    tokenizer = LanceTokenizer(paths.lance_dir, weights.llm.config)
    plan = streamer = None
    if memory == "resident":
        weights.to(device)
    else:
        plan, streamer = prepare_plan(memory, weights.llm, weights.vit, weights.vae, device, budget, ())
    session = LanceSession(paths, weights.llm, tokenizer, weights.vit, weights.vae, memory, device, {}, plan,
                           streamer)
    session.place_weights()
    return LancePipeline(session)


def compute_device(smoke: bool) -> torch.device:
    """The CPU for --smoke, else the current CUDA device with its index (some torch.cuda calls refuse "cuda")."""
    return torch.device("cpu") if smoke else cuda_device()


def release_memory(device: torch.device) -> None:
    """Drop what the last measurement left (cycles included) and give the allocator's cache back to the device."""
    gc.collect()
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_cap(device: torch.device, limit: int):
    """The allocator of `device` capped at `limit` bytes, as on a card of that size (no cap off CUDA); the
    fraction is back at 1.0 afterwards, whatever happened."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ---------------------------------------------------------------- the JSON report, and one try per measurement
class Report:
    """Every figure of a run as JSON, rewritten after each addition (a run cut short keeps what it measured)."""

    def __init__(self, path: Path, **header):
        self.path, self.data = path, dict(header)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def append(self, key: str, entry: dict) -> dict:
        self.data.setdefault(key, []).append(entry)
        self.save()
        return entry

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1))
        partial.replace(self.path)


def attempt(label: str, run, device: torch.device):
    """(run(), None), or (None, "Type: first line") after printing it with the three innermost frames (torch's
    out-of-memory messages run to many lines)."""
    try:
        return run(), None
    except Exception as exc:  # noqa: BLE001 - one failing measurement must not hide the others
        error = f"{type(exc).__name__}: {first_line(exc)}"
        print(f"  {label} FAILED: {error}\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:]), end="", flush=True)
    release_memory(device)
    return None, error


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> dict:
    """Peak allocated and reserved bytes since the last reset_peak (None on the CPU)."""
    if device.type != "cuda":
        return {"peak_bytes": None, "peak_reserved_bytes": None}
    return {"peak_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def shown(memory: dict) -> str:
    return readable(memory["peak_bytes"]) if memory["peak_bytes"] is not None else "n/a (CPU)"


# ---------------------------------------------------------------- the speed part
def machine(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        print("machine: CPU (no GEMM/SDPA peak measured in smoke mode)")
        return {"device": "cpu"}
    a, b = torch.randn(8192, 8192, device=device, dtype=dtype), torch.randn(8192, 8192, device=device, dtype=dtype)
    gemm = 2 * 8192 ** 3 / min(seconds(lambda: a @ b, device) for _ in range(5))
    q = torch.randn(2, 16, 2400, 128, device=device, dtype=dtype)
    k = torch.randn(2, 2, 2400, 128, device=device, dtype=dtype)
    sdpa = 4 * 2 * 16 * 2400 * 2400 * 128 / min(
        seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True), device)
        for _ in range(5))
    found = {"device": torch.cuda.get_device_name(device),
             "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
             "gemm_tflops": gemm / 1e12, "sdpa_tflops": sdpa / 1e12, "copy_tbps": copy_bandwidth(device) / 1e12}
    print(f"machine: {found['device']}, bf16 GEMM {found['gemm_tflops']:.0f} TFLOP/s, SDPA {found['sdpa_tflops']:.0f} "
          f"TFLOP/s, device copy {found['copy_tbps']:.2f} TB/s")
    return found


def warm_then_time(run, steps: int, device: torch.device, warm_decode: bool = True) -> float:
    """Seconds of run(steps) after run(1) (the same request: kernels loaded, prefix prefilled); a video warms
    without its decode (the image rows loaded the VAE's kernels; a 61-frame decode would cost seconds)."""
    if warm_decode:
        run(1)
    else:
        run(1, decode=False)
    return seconds(lambda: run(steps), device)


def per_step(run, steps: int, device: torch.device) -> float:
    """Seconds per denoising step: (a (steps + 1)-step run - a 1-step run) / steps, prefill reused."""
    run(1)
    return (seconds(lambda: run(steps + 1), device) - seconds(lambda: run(1), device)) / steps


def decode_rate(answer, tokens: int, device: torch.device) -> float:
    """Tokens per second of decoding: the difference of a long and a short answer (their prefill cancels)."""
    few, many = 8, 8 + tokens
    answer(few)
    answers = {}
    timed = lambda n: seconds(lambda: answers.setdefault(n, answer(n)), device)
    took = timed(many) - timed(few)
    return (len(answers[many].token_ids) - len(answers[few].token_ids)) / took   # an answer may end early


def test_image(scale: Scale) -> torch.Tensor:
    return torch.rand(1, scale.image, scale.image, 3, generator=torch.Generator().manual_seed(0))


def speed_rows(pipe: LancePipeline, scale: Scale, device: torch.device) -> list[tuple[str, object]]:
    """(figure, measurement) in the order they run: cheap first, the videos last."""
    s, v = scale, scale.video
    image = test_image(s)
    edit_resolution = f"image_{s.image if s.image in (256, 512, 768) else 256}res"

    def t2i(size, **options):
        return lambda n, **more: pipe.text_to_image(PROMPT, width=size, height=size, steps=n, seed=42,
                                                    **options, **more)

    def t2v(frames, **options):
        return lambda n, **more: pipe.text_to_video(VIDEO_PROMPT, width=v[1], height=v[0], num_frames=frames, steps=n,
                                                    seed=42, **options, **more)

    edit = lambda n, **more: pipe.edit_image(image, "Make the sky a warm sunset orange", resolution=edit_resolution,
                                             steps=n, seed=42, **more)
    answer = lambda n: pipe.understand(image, "Describe the image in detail.", max_new_tokens=n,
                                       sampling=SamplingOptions())
    return [
        ("t2i 768^2, 30 steps", lambda: warm_then_time(t2i(s.image), s.steps, device)),
        ("guided step 768^2", lambda: per_step(t2i(s.image, decode=False, cfg_interval=(0.0, 1.0)), 5, device)),
        ("unguided step 768^2", lambda: per_step(t2i(s.image, decode=False, cfg_scale=1.0), 5, device)),
        ("t2i 1024^2, 30 steps", lambda: warm_then_time(t2i(s.large_image), s.steps, device)),
        ("image_edit 768^2, 30 steps", lambda: warm_then_time(edit, s.steps, device)),
        ("x2t decode (tokens/s)", lambda: decode_rate(answer, s.tokens, device)),
        ("t2v 480x848x61, 30 steps", lambda: warm_then_time(t2v(s.frames), s.steps, device, warm_decode=False)),
        ("t2v 480x848x121 guided step", lambda: per_step(t2v(s.long_frames, decode=False, cfg_interval=(0.0, 1.0)),
                                                          1, device)),
    ]


def row_entry(name: str, value: float | None, memory: dict, took: float, error: str | None) -> dict:
    goal, floor = GOALS[name]
    tokens = name.startswith("x2t")
    ratio = None if not value else value / goal if tokens else goal / value
    return {"figure": name, "value": value, "unit": "tokens/s" if tokens else "s", "goal": goal, "floor": floor,
            "ratio": ratio, **memory, "took_s": took, "error": error}


def print_row(row: dict) -> None:
    if row["error"]:
        return   # attempt() printed it
    unit = "tok/s" if row["unit"] == "tokens/s" else "s"
    memory = readable(row["peak_bytes"]) if row["peak_bytes"] is not None else "n/a (CPU)"
    ratio = f"{row['ratio']:13.2f}x" if row["ratio"] is not None else f"{'n/a':>14}"
    print(f"{row['figure']:34} {row['value']:9.3f} {unit:5} {row['goal']:9.3f} {row['floor'] or '':>9} "
          f"{ratio}  {memory}", flush=True)


def measure_rows(pipe: LancePipeline, scale: Scale, device: torch.device, skip: set[str], report: Report) -> None:
    print(f"{'figure':34} {'measured':>11} {'goal':>9} {'floor':>9} {'goal/measured':>14}  peak memory", flush=True)
    for name, measure in speed_rows(pipe, scale, device):
        if skipped(name, skip):
            continue
        reset_peak(device)
        started = time.perf_counter()
        value, error = attempt(name, measure, device)
        row = row_entry(name, value, peak_bytes(device), time.perf_counter() - started, error)
        report.append("rows", row)
        print_row(row)


def profile(pipe: LancePipeline, scale: Scale, device: torch.device) -> dict:
    """GPU busy vs wall over a t2i run, and the shares of GEMM, attention and the rest."""
    if device.type != "cuda":
        print("profile: CUDA only")
        return {}
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
    return {"wall_s": wall, "busy_s": total, **{f"{k.lower()}_s": v for k, v in shares.items()}}


def speed_part(run: "Run") -> None:
    device, scale, skip, report = run.device, run.scale, run.skip, run.report
    if not skipped("machine", skip):
        found, _ = attempt("machine", lambda: machine(device, run.dtype), device)
        report.set("machine", found)
    started = time.perf_counter()
    pipe = pipeline(random_weights(not run.smoke, run.dtype, device), device)
    report.set("speed_model_built_s", time.perf_counter() - started)
    print(f"random model built on {device} in {time.perf_counter() - started:.1f} s", flush=True)
    if run.compiled:
        pipe.llm.compile_steps()
        print("denoising steps compiled (torch.compile)")
    measure_rows(pipe, scale, device, skip, report)
    if not skipped("profile", skip):
        found, _ = attempt("profile", lambda: profile(pipe, scale, device), device)
        report.set("profile", found)
    pipe = None   # dropped here, not at the end of the function
    if run.compiled:
        torch._dynamo.reset()   # compiled code holds the model: the budgets part must find the device empty
    release_memory(device)


# ---------------------------------------------------------------- the budgets part
def release_plans(gib: list[float], report: Report) -> None:
    """The release's weights per group in bf16 (built on the meta device: no memory) and the plan each card size
    picks with the working reserve of a 768^2 image (vram_plan.py's arithmetic; the budgets below run them)."""
    llm, vit, vae = architecture(True, torch.bfloat16)
    sizes = WeightBytes.of(llm, vit, vae)
    work = working_reserve(llm.config, RELEASE_VAE["decoder_base_dim"], torch.bfloat16)
    print(f"release weights (bf16): understanding expert {readable(sizes.und)}, generation expert "
          f"{readable(sizes.gen)}, shared {readable(sizes.shared)} (LLM {readable(sizes.und + sizes.gen + sizes.shared)}), "
          f"ViT {readable(sizes.vit)}, VAE {readable(sizes.vae)}; all {readable(sizes.device_bytes(candidates()[0]))}; "
          f"working reserve of a 768^2 image {readable(work)}")
    plans = []
    for g in gib:
        entry = {"card_gib": g}
        try:
            plan = choose_plan(int(g * GIB) - DEVICE_MARGIN, sizes, work)
            entry.update(plan=plan.describe(), device_bytes=sizes.device_bytes(plan))
            print(f"  {g:g} GiB card: {entry['plan']} ({readable(entry['device_bytes'])} of weights on the device)")
        except Exception as exc:  # noqa: BLE001 - a card too small is a result
            entry["error"] = first_line(exc)
            print(f"  {g:g} GiB card: {entry['error']}")
        plans.append(entry)
    report.set("release_plans", {"weights": asdict(sizes), "working_reserve_bytes": work, "cards": plans})


def budget_limits(weights: Weights, gib: list[float], smoke: bool) -> list[int]:
    """Bytes per budget: the --budget-gib sizes; smoke: from the tiny model's own weights, one per distinct plan."""
    if not smoke:
        return [int(g * GIB) for g in gib]
    sizes, llm = weights.sizes(), weights.llm
    work = working_reserve(llm.config, int(weights.vae.module.config.decoder_base_dim), llm.dtype)
    limits = {}
    for plan in candidates():
        limit = sizes.device_bytes(plan) + work
        limits.setdefault(choose_plan(limit, sizes, work), limit)
    return list(limits.values())


def budget_tasks(pipe: LancePipeline, scale: Scale) -> list[tuple[str, object]]:
    v, image = scale.video, test_image(scale)
    return [
        ("t2i 768^2, 30 steps", lambda: pipe.text_to_image(PROMPT, width=scale.image, height=scale.image,
                                                           steps=scale.steps, seed=42)),
        ("t2v 480x848x121, 1 guided step + decode", lambda: pipe.text_to_video(
            VIDEO_PROMPT, width=v[1], height=v[0], num_frames=scale.long_frames, steps=1, cfg_interval=(0.0, 1.0))),
        (f"x2t {scale.answer_tokens} tokens about an image", lambda: pipe.understand(
            image, "What is in this picture?", max_new_tokens=scale.answer_tokens, sampling=SamplingOptions())),
    ]


def one_budget(host: Weights, limit: int, run: "Run", entry: dict) -> None:
    """A fresh placement of the host weights under the cap, then one run of each task."""
    device, report = run.device, run.report
    with memory_cap(device, limit):
        entry["allocated_before_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        started = time.perf_counter()
        # on CUDA the plan reads the capped allocator itself (memory.available_bytes), as a user's load would
        pipe = pipeline(host.shallow_copy(), device, "auto", None if device.type == "cuda" else limit)
        entry.update(plan=pipe.plan.describe(), place_s=time.perf_counter() - started,
                     placed_bytes=torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
        report.save()
        placed = f", {readable(entry['placed_bytes'])} placed" if entry["placed_bytes"] is not None else ""
        print(f"budget {readable(limit)}: {entry['plan']} (placement {entry['place_s']:.1f} s{placed})", flush=True)
        for name, task in budget_tasks(pipe, run.scale):
            if skipped(name, run.skip):
                continue
            reset_peak(device)
            result, error = attempt(name, lambda: seconds_and_result(task, device), device)
            took, answer = result if result else (None, None)
            task_entry = {"task": name, "seconds": took, **peak_bytes(device), "error": error}
            if answer is not None and hasattr(answer, "token_ids"):
                task_entry["tokens"] = len(answer.token_ids)
            entry["tasks"].append(task_entry)
            report.save()
            if not error:
                print(f"  {name:42} {took:8.2f} s   peak {shown(task_entry)}", flush=True)
        if not skipped("swap", run.skip):
            attempt("swap", lambda: swap(pipe, device, entry), device)
            report.save()


def swap(pipe: LancePipeline, device: torch.device, entry: dict) -> None:
    """ComfyUI unloading Lance for another model and loading it again (its patcher offloads and places the plan):
    the bytes the patcher reports against the bytes freed, and the seconds each way."""
    session = pipe.session
    session.release_scratch()   # the stores aside: the patcher reports weights and slots
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    entry["reported_bytes"] = session.device_bytes()
    entry["offload_s"] = seconds(session.offload_weights, device)
    entry["freed_bytes"] = before - torch.cuda.memory_allocated(device) if before is not None else None
    entry["replace_s"] = seconds(session.place_weights, device)
    freed = f", {readable(entry['freed_bytes'])} freed" if entry["freed_bytes"] is not None else ""
    print(f"  swap: {readable(entry['reported_bytes'])} reported{freed}; offload {entry['offload_s']:.2f} s, "
          f"place again {entry['replace_s']:.2f} s", flush=True)


def seconds_and_result(task, device: torch.device) -> tuple[float, object]:
    out = []
    return seconds(lambda: out.append(task()), device), out[0]


def budgets_part(run: "Run") -> None:
    device, report = run.device, run.report
    if not skipped("plans", run.skip):
        attempt("plans", lambda: release_plans(run.gib, report), device)
    started = time.perf_counter()
    host = random_weights(not run.smoke, run.dtype, device).to("cpu")   # placements expect host memory
    release_memory(device)
    sizes = host.sizes()
    report.set("budgets_model_built_s", time.perf_counter() - started)
    report.set("weights", asdict(sizes))
    print(f"random model built on {device} and moved to host memory in {time.perf_counter() - started:.1f} s; "
          f"weights: understanding expert {readable(sizes.und)}, generation expert {readable(sizes.gen)}, "
          f"shared {readable(sizes.shared)}, ViT {readable(sizes.vit)}, VAE {readable(sizes.vae)}", flush=True)
    for limit in budget_limits(host, run.gib, run.smoke):
        entry = report.append("budgets", {"budget_bytes": limit, "budget": readable(limit), "plan": None,
                                           "place_s": None, "allocated_before_bytes": None, "placed_bytes": None,
                                           "tasks": [], "reported_bytes": None, "freed_bytes": None,
                                           "offload_s": None, "replace_s": None, "error": None})
        _, entry["error"] = attempt(f"budget {readable(limit)}", lambda: one_budget(host, limit, run, entry), device)
        report.save()
        release_memory(device)   # the next budget measures its own placement only


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


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    scale: Scale
    smoke: bool
    skip: set[str]
    gib: list[float]
    compiled: bool
    report: Report


def skipped(name: str, skip: set[str]) -> bool:
    return any(name.startswith(word) for word in skip)


def default_json(part: str, smoke: bool) -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "out"
    return folder / f"bench_gpu_{part}{'_smoke' if smoke else ''}.json"


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (a test runs this)")
    parser.add_argument("--budget-gib", default="8,12,16,24")
    parser.add_argument("--skip", default="", help="comma-separated name prefixes of rows, tasks and sections "
                                                   "(machine, profile, ops, plans) to skip")
    parser.add_argument("--compile", action="store_true", help="the speed rows with the compiled denoising step")
    parser.add_argument("--json", type=Path, help="where the figures go (default: see the module docstring)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU path", file=sys.stderr)
        return 2
    parts = PARTS if args.part == "all" else (args.part,)
    device, dtype = compute_device(args.smoke), torch.float32 if args.smoke else torch.bfloat16
    report = Report(args.json or default_json(args.part, args.smoke), part=args.part, smoke=args.smoke,
                    torch=torch.__version__, cuda=torch.version.cuda, dtype=str(dtype), device=str(device),
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    scale=asdict(SMOKE if args.smoke else Scale()), budget_gib=args.budget_gib)
    run = Run(device, dtype, SMOKE if args.smoke else Scale(), args.smoke, set(filter(None, args.skip.split(","))),
              [float(g) for g in args.budget_gib.split(",")], args.compile, report)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {'smoke (CPU, toy sizes)' if args.smoke else 'release configuration'}, {dtype}, "
          f"part {args.part}; figures also in {report.path}", flush=True)
    part_seconds = {}
    for part in parts:
        part_started = time.perf_counter()
        attempt(f"{part} part", lambda: (speed_part if part == "speed" else budgets_part)(run), device)
        part_seconds[part] = time.perf_counter() - part_started
        report.set("part_seconds", part_seconds)
        print(f"{part} part: {part_seconds[part]:.0f} s", flush=True)
    ops = None
    if "speed" in parts and not skipped("ops", run.skip):
        ops, _ = attempt("ops", op_counts, device)
        report.set("ops", ops and {"per_layer_step": ops[0], "per_layer_token": ops[1]})
    report.set("host_peak_bytes", host_peak_bytes())
    report.set("seconds", time.perf_counter() - started)
    print(f"total {report.data['seconds']:.0f} s (host memory peak {readable(report.data['host_peak_bytes'])})")
    if ops:
        print(f"ops per layer-step {ops[0]:.1f}, ops per layer-token {ops[1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
