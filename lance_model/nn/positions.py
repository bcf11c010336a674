"""Positions: 3-axis mRoPE indices (with Lance's modality shift rule), rotary tables, and the additive
3-D sin-cos latent position embedding."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

VIT_SHIFT_BASE = 1000  # the ViT block of an edit source starts its temporal axis here (reference shift rule)


@dataclass(frozen=True)
class GridBlock:
    """One visual block as the position scan sees it: payload start in the sequence and its pre-merge grid."""

    payload_start: int
    grid: tuple[int, int, int]  # (t, h, w) in pre-merge units: ViT (T/2, H/14, W/14), latent (t, 2h, 2w)


def rope_index(length: int, blocks: list[GridBlock], merge: int, tokens_per_second: float) -> torch.Tensor:
    """[3, length] int64 positions (t, h, w axes). Text advances all axes together; a visual payload is laid
    out on its (frame, row, column) grid starting one after the preceding token, and the next token continues
    after the block's largest index."""
    pos = torch.empty(3, length, dtype=torch.long)
    next_pos, cursor = 0, 0
    for block in blocks:
        text_len = block.payload_start - cursor
        pos[:, cursor:block.payload_start] = torch.arange(next_pos, next_pos + text_len)
        base = next_pos + text_len
        gt, gh, gw = block.grid[0], block.grid[1] // merge, block.grid[2] // merge
        frames = (torch.arange(gt) * tokens_per_second).long()
        grid_t = frames.view(-1, 1, 1).expand(gt, gh, gw)
        grid_h = torch.arange(gh).view(1, -1, 1).expand(gt, gh, gw)
        grid_w = torch.arange(gw).view(1, 1, -1).expand(gt, gh, gw)
        count = gt * gh * gw
        payload = torch.stack([grid_t, grid_h, grid_w]).reshape(3, count) + base
        pos[:, block.payload_start:block.payload_start + count] = payload
        next_pos = int(payload.max()) + 1
        cursor = block.payload_start + count
    pos[:, cursor:] = torch.arange(next_pos, next_pos + length - cursor)
    return pos


def apply_modality_shift(pos: torch.Tensor, codes: torch.Tensor, vit_code: int, source_code: int,
                         target_code: int) -> torch.Tensor:
    """Reference shift rule for sequences with bidirectional condition blocks (edits):
    the ViT block's temporal axis is moved to start at 1000, and the target block copies the positions of the
    source latent block when both have the same token count (single-source edit)."""
    pos = pos.clone()
    vit = codes == vit_code
    if vit.any():
        first = int(torch.nonzero(vit)[0])
        pos[0, vit] += VIT_SHIFT_BASE - pos[0, first]
    source, target = codes == source_code, codes == target_code
    if source.any() and int(source.sum()) == int(target.sum()):
        pos[:, target] = pos[:, source]
    return pos


class MultimodalRotary:
    """cos/sin tables for 3-axis mRoPE: frequency slot j uses the axis its mrope section assigns."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, int, int]):
        # explicit cpu: models are built under a meta-device context, these small tables must stay real
        slots = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")
        self.inv_freq = (1.0 / theta ** (slots / head_dim)).float()
        self.axis_of_slot = torch.cat([torch.full((n,), axis, dtype=torch.long, device="cpu") for axis, n in enumerate(section)])

    def __call__(self, pos: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [B, 3, L] -> cos, sin [B, L, head_dim] (computed in fp32)."""
        if self.inv_freq.device != pos.device:  # moved once: no host copies per call (CUDA-graph safe)
            self.inv_freq, self.axis_of_slot = self.inv_freq.to(pos.device), self.axis_of_slot.to(pos.device)
        inv_freq = self.inv_freq
        angles = pos.float().unsqueeze(-1) * inv_freq  # [B, 3, L, D/2]
        axis = self.axis_of_slot
        chosen = angles.gather(1, axis.view(1, 1, 1, -1).expand(angles.shape[0], 1, angles.shape[2], -1)).squeeze(1)
        emb = torch.cat([chosen, chosen], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass(frozen=True)
class Rope:
    """Rotary tables of one block laid out like its q/k ([B, L, heads, D]): cos, and sin with the first half
    negated, so that rotating is x * cos + roll(x, D/2) * sin (the rotate-half convention, no concatenation)."""

    cos: torch.Tensor   # [B, L, 1, D] fp32
    sin: torch.Tensor   # [B, L, 1, D] fp32, first half negated

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> "Rope":
        """From MultimodalRotary's [B, L, D] tables."""
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cls(cos.unsqueeze(2), signed.unsqueeze(2))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, H, D] rotated in fp32 (as the reference) and returned in x's dtype."""
        out = torch.addcmul(x * self.cos, x.roll(x.shape[-1] // 2, dims=-1), self.sin)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def _sincos(width: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = positions.double().unsqueeze(-1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def latent_position_embedding(frames: int, height: int, width: int, hidden: int, max_latent_size: int) -> torch.Tensor:
    """[frames*height*width, hidden] float64 rows of the reference's fixed 3-D sin-cos table, computed for the
    requested block only (the full 31x64x64 table is ~1 GB at release width). The flat index t*S*S + y*S + x is
    decoded back to (t, y, x) so an out-of-range y or x aliases exactly as the reference table lookup does."""
    size = max_latent_size
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    flat = (t * size * size + y * size + x).reshape(-1)
    t_idx, y_idx, x_idx = flat // (size * size), (flat // size) % size, flat % size
    axis_width = hidden // 3
    axis_width -= axis_width % 2
    return torch.cat([
        _sincos(axis_width, t_idx), _sincos(axis_width, y_idx), _sincos(hidden - 2 * axis_width, x_idx),
    ], dim=-1)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] flow times in [0, 1] (not scaled) -> [N, dim] = [cos, sin] features in fp32."""
    args = t.float().unsqueeze(-1) * _frequencies(dim, max_period, t.device)
    return torch.cat([args.cos(), args.sin()], dim=-1)


@functools.lru_cache(maxsize=8)
def _frequencies(dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)
