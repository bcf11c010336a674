"""A generation request as data: the target's latent grid, everything the sampler is fed besides the noise, and
the two layouts of latents (raster tokens [B, N, C] and video [B, C, t, h, w])."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .packing import PackedSequence


@dataclass(frozen=True)
class LatentGrid:
    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def rope_grid(self) -> tuple[int, int, int]:
        return (self.frames, 2 * self.height, 2 * self.width)  # x2 cancels the position scan's 2x2 merge


@dataclass
class GenerationInputs:
    """Everything one request feeds the sampler besides the noise."""

    seq: PackedSequence
    target: LatentGrid
    vit_embeds: list[torch.Tensor] = field(default_factory=list)     # [n, H] per ViT block, in order
    source_latents: list[torch.Tensor] = field(default_factory=list)  # [n, C] clean normalized, per source block
    first_frame: torch.Tensor | None = None                           # [h*w, C] i2v clean frame-0 latent
    # the negative prompt packed in the caption's place: the uncond branch's whole prefix; None = caption dropped
    negative_seq: PackedSequence | None = None

    @property
    def frozen_tokens(self) -> int:
        """Leading target tokens that stay clean at t = 0 (i2v's first frame)."""
        return 0 if self.first_frame is None else self.first_frame.shape[0]


def tokens_to_video(tokens: torch.Tensor, grid: LatentGrid) -> torch.Tensor:
    """[B, N, C] raster tokens -> [B, C, t, h, w]."""
    b, _, c = tokens.shape
    return tokens.view(b, grid.frames, grid.height, grid.width, c).permute(0, 4, 1, 2, 3).contiguous()


def video_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, t, h, w] -> [B, N, C] raster tokens."""
    b, c = latents.shape[:2]
    return latents.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
