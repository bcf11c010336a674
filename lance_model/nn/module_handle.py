"""Base for the thin wrappers around library networks (diffusers VAE, transformers ViT)."""
from __future__ import annotations

import torch


class ModuleHandle:
    """Holds one torch module; dtype and device are read from its weights (they follow .to() moves)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device
