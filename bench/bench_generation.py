"""Generation speed: time per denoising step (batched vs sequential CFG) for the fixture tasks on the tiny model,
and for a real-width LLM (hidden 2048, a few layers, random weights) at a chosen latent size; peak memory on CUDA.

    python bench/bench_generation.py [--device cpu|cuda] [--layers 4] [--size 256] [--frames 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, random_llm, real_width_config, timed  # noqa: E402
from lance_model.tasks.branches import BranchEngine  # noqa: E402
from lance_model.tasks.generation import initial_noise  # noqa: E402
from lance_model.tasks.guidance import GuidanceOptions  # noqa: E402
from lance_model.tasks.request import GenerationInputs, LatentGrid  # noqa: E402
from lance_model.tasks.sampler import FlowSampler, SamplerOptions  # noqa: E402

STEPS = 4


def step_time(llm, inputs: GenerationInputs, batched: bool, device: torch.device) -> float:
    """Seconds per guided step, prefill excluded: (best STEPS+1-step run - best 1-step run) / STEPS."""
    noise = initial_noise(inputs, [0], llm.config.constants.latent_channels)
    guidance = GuidanceOptions(interval=(0.0, 1.0))

    def run(steps):
        with torch.inference_mode():
            return FlowSampler(BranchEngine(llm), inputs, SamplerOptions(steps, 3.5, guidance, batched), 1).sample(noise)
    return (timed(lambda: run(STEPS + 1), device) - timed(lambda: run(1), device)) / STEPS


def report(label, llm, inputs, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batched, sequential = step_time(llm, inputs, True, device), step_time(llm, inputs, False, device)
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"{label}: {inputs.target.tokens} target tokens, {len(inputs.seq)} sequence tokens | step with CFG "
          f"batched {batched * 1e3:.1f} ms, sequential {sequential * 1e3:.1f} ms{peak}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="real-width run: output height = width in pixels")
    parser.add_argument("--frames", type=int, default=1, help="real-width run: output frames (4k+1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}, dtype {dtype}, threads {torch.get_num_threads()}")

    from lance_model import load_lance
    from tests.helpers import GEN_TASKS, Golden, prepare, settings_for

    golden = Golden(GOLDEN)
    pipe = load_lance(GOLDEN / "checkpoint", dtype=dtype, device=device)
    for name in GEN_TASKS:
        report(f"tiny {name}", pipe.llm, prepare(pipe, golden, name, settings_for(golden, name)), device)

    llm = random_llm(real_width_config(args.layers), dtype, device)
    grid = LatentGrid((args.frames - 1) // 4 + 1, args.size // 16, args.size // 16)
    from lance_model.tasks.prepare import text_to_visual_sequence
    seq = text_to_visual_sequence(pipe.session, "a red cat holds a blue sign", grid, video=args.frames > 1)
    report(f"real width ({args.layers} layers) {args.size}px x {args.frames} frames", llm, GenerationInputs(seq, grid), device)


if __name__ == "__main__":
    main()
