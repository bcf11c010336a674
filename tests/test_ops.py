"""lance_model/nn/ops.py: the RMSNorm every LLM layer uses, in the user's precision (bf16)."""
from __future__ import annotations

import torch

from lance_model.nn.ops import RMSNorm


def qwen2_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm arithmetic in fp32 throughout (the official model normalizes in fp32)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def test_rms_norm_in_bf16_is_the_fp32_normalization_rounded_once():
    """bf16 inputs are normalized in fp32 (torch >= 2.7, below the declared floor; up to 2.6 F.rms_norm worked in
    bf16: 1.2e-2 off at 2.5, 7.5e-3 at 2.6): the result is within one bf16 rounding of the fp32 computation, over
    rows of very different scales."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-4, 4, 9).view(-1, 1)
    x = (torch.randn(9, 2048, generator=generator) * scales).to(torch.bfloat16)
    norm = RMSNorm(2048, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(2048, generator=generator))
        ours = norm(x)
    reference = qwen2_reference(x, norm.weight, 1e-6)
    assert ours.dtype == torch.bfloat16
    relative = ((ours.float() - reference).abs() / reference.abs().clamp(min=1e-6)).max()
    assert relative <= 2 ** -8, f"bf16 RMSNorm off the fp32 normalization by {relative:.2e} (relative)"
