"""The operations namespace layers are built from. Hosts may inject their own (ComfyUI passes
`comfy.ops.manual_cast`, whose Linear/Embedding/RMSNorm support low-VRAM partial loading); torch.nn plus the
Qwen2 RMSNorm below is the default."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm (normalise in fp32, then scale) as torch's fused rms_norm: one op instead of seven; in
    fp32 the same numbers, in bf16 the product with the scale is rounded once instead of twice."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device != x.device or weight.dtype != x.dtype:   # a host's low-VRAM loading may keep it in RAM
            weight = weight.to(device=x.device, dtype=x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class TorchOps:
    Linear = nn.Linear
    Embedding = nn.Embedding
    RMSNorm = RMSNorm


def norm_layer(ops, dim: int, eps: float) -> nn.Module:
    """An RMSNorm from the namespace (hosts without one get the default)."""
    return getattr(ops, "RMSNorm", RMSNorm)(dim, eps=eps)
