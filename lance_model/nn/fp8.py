"""fp8 weight storage: Linear weights kept as float8 e4m3 with one scale per output channel; the weight is cast to
the compute dtype right before the matmul (exact) and the scale multiplies the product. Halves the bytes a weight
occupies (resident) or moves (streamed); works on any device torch can cast float8 on (every CUDA GPU and the CPU),
with no fp8 matmul kernel needed.

Only the experts' attention projections and MLPs are ever stored in fp8 - never embeddings, the LM head, the latent
projections, the time embedder or norms - and only when the caller asks: it changes the picture, and random
weights cannot show by how much on real pictures (the gate in tests/test_vram_plan.py and bench/bench_fp8.py
measures random weights only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .llm import GEN

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max      # 448
EXPERTS = ("und", "gen")


def quantize(weight: torch.Tensor, work_device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8 weight, fp32 scale [out]) with weight ~= fp8.float() * scale[:, None], both where the
    weight is; computed on `work_device` (a GPU does a release expert in a second, a CPU core in minutes)."""
    w = weight.detach().to(work_device or weight.device, torch.float32)
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).to(FP8).to(weight.device), scale.to(weight.device)


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in fp8 (per-output-channel scale); the bias stays in the compute dtype."""

    def __init__(self, linear: nn.Linear, work_device: torch.device | None = None):
        super().__init__()
        weight, scale = quantize(linear.weight, work_device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel scale multiplies the product, in fp32 (an fp8 weight is exact in any compute dtype): no
        scaled copy of the weight, no rounding of the scale to the compute dtype."""
        out = F.linear(x, self.weight.to(device=x.device, dtype=x.dtype)) * self.weight_scale.to(x.device)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.device)


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


def store_experts_in_fp8(llm: nn.Module, experts: tuple[str, ...], work_device: torch.device | None = None) -> int:
    """Replace the named experts' Linear layers with Fp8Linear in place (quantized on `work_device`); returns the
    bytes saved."""
    saved = 0
    for expert in experts:
        for owner, name, linear in expert_linears(llm, expert):
            if isinstance(linear, Fp8Linear):
                continue
            if type(linear) is not nn.Linear:
                raise TypeError(f"fp8 storage needs torch.nn.Linear layers, got {type(linear).__name__} (a host's "
                                f"own operations manage their weights themselves)")
            saved += linear.weight.numel() * (linear.weight.element_size() - 1)
            setattr(owner, name, Fp8Linear(linear, work_device))
    return saved
