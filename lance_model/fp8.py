"""fp8 weight storage: Linear weights kept as float8 e4m3 with one scale per output channel, dequantized to the
compute dtype right before the matmul. Halves the bytes a weight occupies (resident) or moves (streamed); works
on any device torch can cast float8 on (every CUDA GPU and the CPU), with no fp8 matmul kernel needed.

Quality is measured, not assumed: tests/test_vram_plan.py on the tiny fixtures, bench/bench_fp8.py on the mid release
(final-latent error, decoded-pixel PSNR, greedy-id agreement against bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .llm import GEN

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max      # 448
EXPERTS = ("und", "gen")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8 weight, fp32 scale [out]) with weight ~= fp8.float() * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).to(FP8), scale


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in fp8 (per-output-channel scale); the bias stays in the compute dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.weight = nn.Parameter(weight.to(linear.weight.device), requires_grad=False)
        self.register_buffer("weight_scale", scale.to(linear.weight.device))
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return (self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.device), None if self.bias is None else self.bias.to(x.device))


def expert_linears(llm: nn.Module, expert: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(owner, attribute, Linear) of every projection and MLP of one expert ("und" or "gen") in every layer."""
    gen = expert == "gen"
    suffix = GEN if gen else ""
    found = []
    for layer in llm.language_model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp_moe_gen if gen else layer.mlp
        found += [(attention, name + suffix, module) for name, module in attention.expert(gen).items()
                  if name.endswith("_proj")]
        found += [(mlp, name, getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
    return found


def store_experts_in_fp8(llm: nn.Module, experts: tuple[str, ...]) -> int:
    """Replace the named experts' Linear layers with Fp8Linear in place; returns the bytes saved."""
    saved = 0
    for expert in experts:
        for owner, name, linear in expert_linears(llm, expert):
            if isinstance(linear, Fp8Linear):
                continue
            if type(linear) is not nn.Linear:
                raise TypeError(f"fp8 storage needs torch.nn.Linear layers, got {type(linear).__name__} (a host's "
                                f"own operations manage their weights themselves)")
            saved += linear.weight.numel() * (linear.weight.element_size() - 1)
            setattr(owner, name, Fp8Linear(linear))
    return saved
