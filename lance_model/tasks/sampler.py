"""The library's flow-matching sampler: the shifted schedule, guidance and the Euler loop, over the CFG branches
of branches.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Cancelled
from ..io.validation import require_bool, require_float, require_int
from .branches import BranchEngine, cfg_branches
from .guidance import GuidanceOptions, guided_velocity
from .request import GenerationInputs

MAX_STEPS = 1000


@dataclass(frozen=True)
class SamplerOptions:
    steps: int = 30
    shift: float = 3.5
    guidance: GuidanceOptions = field(default_factory=GuidanceOptions)
    batched_cfg: bool | None = None            # True / False, or None = auto (branches.BATCHED_CFG_MAX_TOKENS)
    state_dtype: torch.dtype = torch.float32   # the reference keeps the Euler state in bf16

    def validate(self) -> None:
        require_int(self.steps, "steps", 1, MAX_STEPS)
        require_float(self.shift, "shift", above=0.0, maximum=1000.0)
        if self.batched_cfg is not None:
            require_bool(self.batched_cfg, "batched_cfg")
        self.guidance.validate()

    @property
    def timesteps(self) -> torch.Tensor:
        return flow_timesteps(self.steps, self.shift)


@dataclass
class StepInfo:
    step: int
    total: int
    t: float
    x0: torch.Tensor                 # [B, N, C] predicted clean target latents (for previews)
    v_cond: torch.Tensor             # [B, N, C]
    v_uncond: torch.Tensor | None
    v: torch.Tensor                  # velocity used for the update (after CFG and renorm)
    v_image_uncond: torch.Tensor | None = None   # image CFG's media-dropped branch


def flow_timesteps(steps: int, shift: float) -> torch.Tensor:
    """Shifted schedule t_i = s*u / (1 + (s-1)*u) over u = linspace(1, 0, steps+1) (fp32 as the reference)."""
    u = torch.linspace(1, 0, steps + 1)
    return shift * u / (1 + (shift - 1) * u)


class FlowSampler:
    def __init__(self, engine: BranchEngine, inputs: GenerationInputs, options: SamplerOptions, batch: int):
        """Prefills (or restores) every CFG branch the run will need, `batch` rows each."""
        self.engine, self.inputs, self.opts = engine, inputs, options
        timesteps = options.timesteps
        self.timesteps = timesteps.tolist()
        self.dts = (timesteps[:-1] - timesteps[1:]).tolist()   # in fp32, as the reference
        count = options.guidance.branch_count(options.timesteps)
        self.branches = cfg_branches(inputs, count, options.guidance.uncond_positions)
        engine.ensure(self.branches, batch)
        engine.prepare_times(self.timesteps[:-1])

    def sample(self, noise: torch.Tensor, on_step: Callable[[StepInfo], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Denoise `noise` [B, N, C]; returns the final target latents [B, N, C] (normalized, fp32). Frozen
        leading tokens (i2v's first frame) are the request's clean latent throughout."""
        x = noise.to(self.engine.llm.device, self.opts.state_dtype, copy=True)
        frozen = self.inputs.frozen_tokens
        if frozen:
            x[:, :frozen] = self.inputs.first_frame.to(x)
        total = self.opts.steps
        for i in range(total):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled at step {i + 1}/{total}")
            t, dt = self.timesteps[i], self.dts[i]
            v_cond, v_uncond, v_image_uncond = self._velocities(x, t)
            v = v_cond if v_uncond is None else guided_velocity(v_cond, v_uncond, v_image_uncond, self.opts.guidance)
            if on_step is not None:   # the predicted clean latents, for previews
                x0 = x.float() - t * v
                x0[:, :frozen] = x[:, :frozen].float()
                on_step(StepInfo(i, total, t, x0, v_cond, v_uncond, v, v_image_uncond))
            euler_step(x, v, dt, frozen)
        return x.float()

    def _velocities(self, x: torch.Tensor, t: float) -> list[torch.Tensor | None]:
        """[v_cond, v_uncond, v_image_uncond], None for the branches that do not run at t."""
        branches = self.branches if self.opts.guidance.active(t) else self.branches[:1]
        velocities = self.engine.velocities([(branch, x, t) for branch in branches], self.opts.batched_cfg)
        return velocities + [None] * (3 - len(velocities))


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: float, frozen: int) -> None:
    """x <- x - v dt in place (in fp32, whatever the state dtype), the first `frozen` tokens untouched."""
    if frozen:
        x, v = x[:, frozen:], v[:, frozen:]
    if x.dtype == torch.float32:
        x.sub_(v * dt)
    else:
        x.copy_(x.float() - v * dt)
