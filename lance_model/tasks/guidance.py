"""Classifier-free guidance: text CFG, image CFG for edits, the timestep interval and the renorm.

The guided velocity is v_u + g_t (v_c - v_u) with text CFG only, and v_uu + g_t (v_c - v_u) + g_v (v_u - v_uu)
with image CFG, which is the former exactly when g_v = 1 (so image CFG is off at 1 and its branch never runs).
The same combination serves the library sampler and a host's guider (ComfyUI's sigma * v values: the
combination is linear and the renorm ratio does not depend on sigma).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..io.validation import require_choice, require_float

RENORM_TYPES = ("global", "channel", "none")
# reference_kv: the uncond prefix keeps the cond positions (the official KV path); contiguous: recomputed
UNCOND_POSITIONS = ("reference_kv", "contiguous")
MAX_SCALE = 1000.0


@dataclass(frozen=True)
class GuidanceOptions:
    scale: float = 4.0
    interval: tuple[float, float] = (0.4, 1.0)   # guidance applies when interval[0] < t <= interval[1]
    renorm: str = "global"
    renorm_min: float = 0.0
    uncond_positions: str = "reference_kv"
    image_scale: float = 1.0                     # g_v; 1 = off (the official behaviour)

    def validate(self) -> None:
        """Every guidance option, named as the task methods name it (InputError)."""
        require_float(self.scale, "cfg_scale", minimum=1.0, maximum=MAX_SCALE)
        check_interval(self.interval)
        require_choice(self.renorm, "cfg_renorm", RENORM_TYPES)
        require_float(self.renorm_min, "cfg_renorm_min", 0.0, 1.0)
        require_choice(self.uncond_positions, "uncond_positions", UNCOND_POSITIONS)
        require_float(self.image_scale, "image_cfg_scale", 0.0, MAX_SCALE)

    @property
    def image_guided(self) -> bool:
        return self.image_scale != 1.0

    def active(self, t: float) -> bool:
        return (self.scale > 1.0 or self.image_guided) and self.interval[0] < t <= self.interval[1]

    def branch_count(self, timesteps: torch.Tensor) -> int:
        """CFG branches a run over `timesteps` needs: cond, + uncond when guidance is active at some step, +
        image-uncond with image CFG."""
        if not any(self.active(float(t)) for t in timesteps[:-1]):
            return 1
        return 3 if self.image_guided else 2


def check_interval(interval) -> tuple[float, float]:
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise InputError(f"cfg_interval must be a pair (start, end) of numbers in 0..1, got {interval!r}")
    low = require_float(interval[0], "cfg_interval start", 0.0, 1.0)
    high = require_float(interval[1], "cfg_interval end", 0.0, 1.0)
    if low > high:
        raise InputError(f"cfg_interval: the start {low} must not be greater than the end {high} (guidance applies "
                         f"for start < t <= end)")
    return low, high


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, v_image_uncond: torch.Tensor | None,
                    guidance: GuidanceOptions) -> torch.Tensor:
    """Text CFG, plus image CFG when the media-dropped branch ran; then the renorm against v_cond. [B, N, C]."""
    v = v_uncond + guidance.scale * (v_cond - v_uncond)
    if v_image_uncond is not None:
        v = v + (guidance.image_scale - 1.0) * (v_uncond - v_image_uncond)   # = v_uu + g_t(..) + g_v(v_u - v_uu)
    return renormalize(v, v_cond, guidance.renorm, guidance.renorm_min)


def renormalize(v: torch.Tensor, v_cond: torch.Tensor, kind: str, minimum: float) -> torch.Tensor:
    """Scale the guided velocity so its norm does not exceed the conditional one (per sample / per token)."""
    if kind == "none":
        return v
    dims = (1, 2) if kind == "global" else (2,)
    scale = (v_cond.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + 1e-8)).clamp(min=minimum, max=1.0)
    return v * scale
