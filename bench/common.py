"""Shared helpers for the benchmarks: timing, memory bandwidth, random-weight models of a chosen width."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from lance_model.nn.attention import Attention
from lance_model.nn.config import LLMConfig
from lance_model.nn.llm import LanceLLM

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LANCE_GOLDEN") or REPO / "tests" / "golden")


def cuda_device(index: int | None = None) -> torch.device:
    """A CUDA device with its index spelled out: some torch.cuda calls (set_per_process_memory_fraction) refuse
    an index-less "cuda"."""
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(cuda_device(device.index))


def seconds(fn, device: torch.device) -> float:
    """Wall time of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Best-of-`repeat` wall time in seconds (after one warm-up call)."""
    fn()
    return min(seconds(fn, device) for _ in range(repeat))


def copy_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes per second of a large tensor copy (read + write counted), the memory-bandwidth yardstick."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device)
    return 2 * src.numel() / seconds


def real_width_config(layers: int) -> LLMConfig:
    """The release architecture (Qwen2.5-VL-3B) with a chosen number of layers; ids from the tiny config file."""
    raw = json.loads((GOLDEN / "checkpoint" / "Lance_3B" / "llm_config.json").read_text())
    raw.update(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    return LLMConfig.from_dict(raw)


def random_llm(cfg: LLMConfig, dtype: torch.dtype, device: torch.device) -> LanceLLM:
    with torch.device("meta"):
        llm = LanceLLM(cfg, attention=Attention("auto"))
    llm = llm.to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for param in llm.parameters():
        param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    for name, module in llm.named_modules():
        if name.endswith("norm") or "layernorm" in name or name.endswith(("q_norm", "k_norm", "q_norm_moe_gen", "k_norm_moe_gen")):
            module.weight.data.fill_(1.0)
    return llm.to(dtype).eval().requires_grad_(False)


def und_expert_bytes(llm: LanceLLM) -> int:
    """Bytes one decode step must read at least: the understanding expert of every layer, the final norm and
    the lm_head (the embedding row is negligible)."""
    total = 0
    for name, param in llm.named_parameters():
        if "_moe_gen" in name or name.startswith(("time_embedder", "vae2llm", "llm2vae")) or "embed_tokens" in name:
            continue
        total += param.numel() * param.element_size()
    return total
