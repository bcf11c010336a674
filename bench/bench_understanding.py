"""Understanding speed: prefill time and decode tokens/s, for the tiny fixture model (through the public loader)
and for a real-width configuration (hidden 2048, a few layers, random weights), compared with the
memory-bandwidth floor (reading the understanding expert's weights once per token).

    python bench/bench_understanding.py [--device cpu|cuda] [--layers 4] [--prompt 512] [--tokens 32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, copy_bandwidth, random_llm, real_width_config, timed, und_expert_bytes  # noqa: E402
from lance_model.tasks.packing import PackedSequence  # noqa: E402
from lance_model.tasks.understanding import decode  # noqa: E402


def text_sequence(length: int, vocab: int) -> PackedSequence:
    from lance_model.tasks.packing import Split

    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length).expand(3, -1)
    return PackedSequence(ids, torch.full((length,), -1), [], [Split(0, length, "causal", -1)], pos, False)


def measure(llm, label: str, prompt: int, tokens: int, bandwidth: float, cuda_graph: bool | None) -> None:
    device = llm.device
    seq = text_sequence(prompt, llm.config.vocab_size)
    embeds = llm.embed_text(seq.ids)
    run = lambda n: decode(llm, seq, embeds, max_new_tokens=n, stop_ids=set(), vocab_limit=llm.config.vocab_size,
                           cuda_graph=cuda_graph)
    prefill = timed(lambda: run(1), device)
    total = timed(lambda: run(tokens), device)
    per_token = (total - prefill) / (tokens - 1)
    floor = und_expert_bytes(llm) / bandwidth
    print(f"{label}: prefill {prompt} tokens {prefill * 1e3:.1f} ms | decode {1 / per_token:.1f} tok/s "
          f"({per_token * 1e3:.2f} ms/token) | bandwidth floor {floor * 1e3:.2f} ms/token "
          f"({und_expert_bytes(llm) / 2**20:.0f} MiB und weights at {bandwidth / 1e9:.1f} GB/s) -> {per_token / floor:.1f}x floor")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-graph", action="store_true", help="decode eagerly even on CUDA (for comparison)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    print(f"device {device}, dtype {dtype}, threads {torch.get_num_threads()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    from lance_model import load_lance

    tiny = load_lance(GOLDEN / "checkpoint", dtype=dtype, device=device).llm
    graph = False if args.no_graph else None
    measure(tiny, "tiny fixture model", args.prompt, args.tokens, bandwidth, graph)
    real = random_llm(real_width_config(args.layers), dtype, device)
    measure(real, f"real width, {args.layers} layers", args.prompt, args.tokens, bandwidth, graph)


if __name__ == "__main__":
    main()
