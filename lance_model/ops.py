"""The operations namespace layers are built from. Hosts may inject their own (ComfyUI passes
`comfy.ops.manual_cast`, whose Linear/Embedding/RMSNorm support low-VRAM partial loading); torch.nn plus the
Qwen2 RMSNorm below is the default."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # .to(device) is a no-op normally; under a host's low-VRAM loading the weight may still be in RAM
        return self.weight.to(device=x.device, dtype=x.dtype) * x32.to(x.dtype)


class TorchOps:
    Linear = nn.Linear
    Embedding = nn.Embedding
    RMSNorm = RMSNorm


def norm_layer(ops, dim: int, eps: float) -> nn.Module:
    """An RMSNorm from the namespace (hosts without one get the default)."""
    return getattr(ops, "RMSNorm", RMSNorm)(dim, eps=eps)
