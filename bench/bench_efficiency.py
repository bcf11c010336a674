"""Forward efficiency of one batched-CFG denoising step at real width (hidden 2048, MLP 11008, 16/2 heads, a few
layers): achieved FLOP/s over this machine's matmul peak, measured in the same run, dtype and threads (the best
of repeated GEMMs of the step's own shapes). Also an interleaved A/B of the step with the marker tokens run per
segment (one understanding-expert call for each marker, the layout before `llm.per_expert`), and of the fused
projections lever: q/k/v and gate/up as separate GEMMs (as the release's weights are laid out) against one
GEMM over the concatenated weights, at the step's shapes.

    python bench/bench_efficiency.py [--layers 2] [--tokens 256,1024,2304] [--prefix 100] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_llm, real_width_config, timed  # noqa: E402
from lance_model.nn import llm as llm_module  # noqa: E402
from lance_model.nn.llm import CacheSlot, query_segments  # noqa: E402

CPU = torch.device("cpu")


def step_flops(cfg, tokens: int, context: int, rows: int) -> float:
    """Multiply-adds x 2 of one step: projections and MLPs of every query token, attention over the context
    (prefix + query block), the latent in/out heads."""
    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token = 2 * h * (q_out + 2 * kv_out) + 2 * q_out * h + 3 * 2 * h * cfg.intermediate_size
    attention = 2 * 2 * cfg.num_heads * cfg.head_dim * context
    block = tokens + 2
    heads = 2 * 2 * cfg.constants.latent_channels * h * tokens
    return rows * (cfg.num_layers * block * (per_token + attention) + heads)


def gemm_peak(cfg, m: int, dtype: torch.dtype, repeat: int) -> float:
    """Best FLOP/s of torch.mm over the step's GEMM shapes [m, k] x [k, n] (gate/up, down, q, o)."""
    h, q_out, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size
    best = 0.0
    for k, n in ((h, inter), (inter, h), (h, q_out), (q_out, h)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        best = max(best, 2 * m * k * n / timed(lambda: torch.mm(a, b), CPU, repeat))
    return best


def linear_time(m: int, k: int, n: int, dtype: torch.dtype, repeat: int) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    return timed(lambda: torch.nn.functional.linear(x, w), CPU, repeat)


def gemm_floor(cfg, tokens: int, dtype: torch.dtype, repeat: int) -> float:
    """Seconds of the step's own projections and MLPs run alone (weights in the release's [out, in] layout),
    every layer: the step's time if nothing but its GEMMs cost anything."""
    h, q_out, kv_out, inter = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                               cfg.intermediate_size)
    shapes = ((h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, inter), (h, inter), (inter, h))
    per_layer = sum(linear_time(m, k, n, dtype, repeat) for m in (2 * tokens, 2 * 2) for k, n in shapes)
    return cfg.num_layers * per_layer


def fusion_ab(cfg, m: int, dtype: torch.dtype, repeat: int) -> dict[str, tuple[float, float]]:
    """Seconds (best of `repeat`, interleaved) of the separate and the fused projections for m rows."""
    h, q_out, kv_out, inter = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                               cfg.intermediate_size)
    x = torch.randn(m, h, dtype=dtype)
    groups = {"q/k/v": [torch.randn(n, h, dtype=dtype) for n in (q_out, kv_out, kv_out)],
              "gate/up": [torch.randn(inter, h, dtype=dtype) for _ in range(2)]}
    result = {}
    for name, weights in groups.items():
        fused = torch.cat(weights)
        separate_fn = lambda: [torch.nn.functional.linear(x, w) for w in weights]
        fused_fn = lambda: torch.nn.functional.linear(x, fused).split([w.shape[0] for w in weights], dim=-1)
        best = [float("inf"), float("inf")]
        for _ in range(repeat):
            for index, fn in enumerate((separate_fn, fused_fn)):
                start = time.perf_counter()
                fn()
                best[index] = min(best[index], time.perf_counter() - start)
        result[name] = (best[0], best[1])
    return result


def per_segment(segments, inputs, fn):
    """Baseline: one expert call per segment (each marker token alone through the understanding expert)."""
    pieces = [fn(*(x[:, s.start:s.end] for x in inputs), s.gen) for s in segments]
    return tuple(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in zip(*pieces))


class Step:
    """One guided step's forward (cond + uncond rows, each over its own prefix) against a filled cache."""

    def __init__(self, llm, tokens: int, prefix: int):
        cfg = llm.config
        self.llm, self.tokens = llm, tokens
        block = tokens + 2
        uncond_prefix = max(1, prefix - prefix // 3)   # the uncond branch drops the caption
        self.cache = llm.new_cache(2, prefix + block)
        for keys, values in zip(self.cache.keys, self.cache.values):
            keys.normal_()
            values.normal_()
        self.slots = [CacheSlot(slice(0, 1), prefix), CacheSlot(slice(1, 2), uncond_prefix)]
        self.query = torch.randn(2, block, cfg.hidden_size, dtype=llm.dtype)
        self.positions = torch.arange(prefix, prefix + block).view(1, 1, -1).expand(2, 3, -1).contiguous()
        self.segments = query_segments(block)
        self.context = (prefix + uncond_prefix) / 2 + block

    def __call__(self) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = self.llm(self.query, self.positions, self.segments, cache=self.cache, causal=False, slots=self.slots)
            self.llm.velocity(out[:, 1:-1])
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", default="256,1024,2304")
    parser.add_argument("--prefix", type=int, default=100, help="prefix (prompt) tokens in the cache")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = real_width_config(args.layers)
    llm = random_llm(cfg, dtype, CPU)
    print(f"threads {torch.get_num_threads()}, {args.dtype}, {args.layers} real-width layers, prefix {args.prefix}")
    print(f"{'tokens':>6} {'peak GF/s':>9} {'step ms':>8} {'GF/s':>7} {'eff':>5} {'GEMMs alone ms':>14} "
          f"{'per-seg ms':>10} {'speedup':>7}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        step = Step(llm, tokens, args.prefix)
        flops = step_flops(cfg, tokens, step.context, rows=2)
        step()
        ours, baseline, peaks, floors = [], [], [], []
        for _ in range(args.repeat):   # interleaved, so drifts of this noisy machine hit both sides alike
            peaks.append(gemm_peak(cfg, 2 * (tokens + 2), dtype, repeat=2))
            floors.append(gemm_floor(cfg, tokens, dtype, repeat=1))
            ours.append(step())
            with mock.patch.object(llm_module, "per_expert", per_segment):
                baseline.append(step())
        peak, best = max(peaks), min(ours)
        print(f"{tokens:>6} {peak / 1e9:>9.1f} {best * 1e3:>8.1f} {flops / best / 1e9:>7.1f} "
              f"{flops / best / peak:>5.2f} {min(floors) * 1e3:>14.1f} {min(baseline) * 1e3:>10.1f} {min(baseline) / best:>6.2f}x"
              f"   (median step {statistics.median(ours) * 1e3:.1f} ms, per-seg {statistics.median(baseline) * 1e3:.1f})")
    print("fused projections (one layer, one expert, both CFG rows): separate -> fused GEMM")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, (separate, fused) in fusion_ab(cfg, 2 * tokens, dtype, args.repeat + 2).items():
            print(f"  {tokens:>5} tokens {name:<8} {separate * 1e3:8.2f} -> {fused * 1e3:8.2f} ms ({separate / fused:.2f}x)")


if __name__ == "__main__":
    main()
