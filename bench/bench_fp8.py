"""The fp8 quality gate on the random "mid" release (bench/random_release.py): each fp8 choice against the same
model unquantized, on the same requests.

    python bench/bench_fp8.py [--size 256] [--steps 10] [--tokens 64] [--dtype fp32]

Prints, per choice (understanding expert in fp8; both experts in fp8): the final-latent relative error and the
decoded-pixel PSNR of a t2i and an image_edit request (goal >= 35 dB with the understanding expert in fp8), and the
greedy-id agreement over --tokens understanding tokens, token by token with the reference's answer fed back
(teacher forcing: random weights give nearly flat logits, so a free-running answer parts at its first near-tie;
the agreement on clear choices - top-1 margin above twice the logit change - is printed beside it).
On a CPU the reference computes in fp32 (bf16 matmuls are slow there): fp8 storage is dequantized to the compute
dtype, so the comparison measures the storage's rounding either way.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_release import mid_release  # noqa: E402
from lance_model import load_lance  # noqa: E402
from tests.helpers import forced_logits  # noqa: E402

GATE_DB = 35.0
CHOICES = {"understanding expert": ("und",), "both experts": ("und", "gen")}


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((frames - reference) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def requests(size: int, steps: int):
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    options = dict(steps=steps, seed=42, cfg_scale=4.0)
    return {
        "t2i": lambda pipe: pipe.text_to_image("A red fox in a snowy forest at dawn", width=size, height=size, **options),
        "image_edit": lambda pipe: pipe.edit_image(image, "Make the sky a warm sunset orange",
                                                  resolution=f"image_{size}res", **options),
    }, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, choices=(256, 512, 768))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    root = mid_release()
    load = lambda **kw: load_lance(root, dtype=args.dtype, device="cpu", **kw)
    runs, image = requests(args.size, args.steps)
    started = time.perf_counter()
    reference = load()
    expected = {name: run(reference) for name, run in runs.items()}
    question, instruction = "Describe the image in detail.", "Look at the image carefully and answer the question."
    answer = reference.understand(image, question, instruction=instruction, max_new_tokens=args.tokens).token_ids
    reference_logits = forced_logits(reference, image, question, instruction, answer)
    del reference
    print(f"mid release {root}, {args.dtype} on CPU, {args.size}^2, {args.steps} steps; reference in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    for label, experts in CHOICES.items():
        pipe = load(fp8=experts)
        for name, run in runs.items():
            result = run(pipe)
            error = ((result.latents - expected[name].latents).norm() / expected[name].latents.norm()).item()
            quality = psnr(result.frames, expected[name].frames)
            verdict = "met" if quality >= GATE_DB else "not met"
            print(f"{label} in fp8, {name}: final-latent relative error {error:.3e}, PSNR {quality:.1f} dB "
                  f"(goal >= {GATE_DB:.0f} dB: {verdict})", flush=True)
        logits = forced_logits(pipe, image, question, instruction, answer)
        same = reference_logits.argmax(-1) == logits.argmax(-1)
        top2 = reference_logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (logits - reference_logits).abs().max(dim=-1).values
        print(f"{label} in fp8, understanding: {int(same.sum())} of {len(answer)} greedy ids agree (teacher-forced), "
              f"{int(same[clear].sum())} of {int(clear.sum())} clear choices", flush=True)
        del pipe


if __name__ == "__main__":
    main()
