"""The options of a generation call, validated in one place (InputError naming the option)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..errors import InputError
from ..io.validation import SEED_MAX, require_bool, require_callable, require_choice, require_int, require_seed
from .context import LanceContext
from .guidance import GuidanceOptions
from .sampler import SamplerOptions

MAX_BATCH = 64


@dataclass
class GenerationSettings:
    steps: int = 30
    shift: float = 3.5
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: str = "global"
    cfg_renorm_min: float = 0.0
    seed: int = 42
    batch_size: int = 1
    batched_cfg: bool | None = None    # None = auto (batched for images and short clips, see branches.py)
    uncond_positions: str = "reference_kv"
    condition_sampling: str = "mean"    # "mean" (deterministic) or "reference" (the official posterior sample)
    euler_state: str = "fp32"           # dtype of the latents between Euler steps; the official code keeps "bf16"
    include_history: bool = False       # put the context's earlier turns into the prompt as text
    decode: bool = True
    on_step: Callable[[int, int, torch.Tensor], None] | None = None   # (step, total, x0 [B, C, t, h, w])
    cancel: Callable[[], bool] | None = None
    context: LanceContext | None = None
    negative_prompt: str = ""          # the uncond branch's text in the caption's place ("" = the official dropped caption)
    image_cfg_scale: float = 1.0       # edits: image CFG (1 = off, the official behaviour; see guidance.py)
    seed_stride: int = 1               # sample i of a batch uses seed + i * seed_stride (see docs/distributed.md)

    def __new__(cls, *args, **kwargs):
        # before the generated __init__, whose bare TypeError would not say which options exist
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        return super().__new__(cls)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationSettings":
        settings = cls(**kwargs)
        settings.validate()
        return settings

    @classmethod
    def of_call(cls, settings: "GenerationSettings | None", options: dict) -> "GenerationSettings":
        """A task method's settings: a GenerationSettings, or keyword options (not both), validated."""
        if settings is None:
            return cls.from_kwargs(options)
        if not isinstance(settings, GenerationSettings):
            raise InputError(f"settings must be GenerationSettings, got {type(settings).__name__}")
        if options:
            raise InputError(f"pass either settings or keyword options, not both (got settings and {sorted(options)})")
        settings.validate()
        return settings

    def validate(self) -> None:
        """Type and range of every option. Seeds are 0..2^64-1; a batch's seeds wrap modulo 2^64."""
        self.sampler_options().validate()
        require_seed(self.seed, "seed")
        require_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        require_int(self.seed_stride, "seed_stride", 1, SEED_MAX)
        require_choice(self.condition_sampling, "condition_sampling", ("mean", "reference"))
        require_choice(self.euler_state, "euler_state", ("fp32", "bf16"))
        require_bool(self.include_history, "include_history")
        require_bool(self.decode, "decode")
        require_callable(self.on_step, "on_step")
        require_callable(self.cancel, "cancel")
        check_context(self.context)

    def sampler_options(self) -> SamplerOptions:
        guidance = GuidanceOptions(self.cfg_scale, self.cfg_interval, self.cfg_renorm, self.cfg_renorm_min,
                                   self.uncond_positions, self.image_cfg_scale)
        state = torch.bfloat16 if self.euler_state == "bf16" else torch.float32
        return SamplerOptions(self.steps, self.shift, guidance, self.batched_cfg, state)

    def seeds(self) -> list[int]:
        return sample_seeds(self.seed, range(self.batch_size), self.seed_stride)


def sample_seeds(seed: int, indices, stride: int = 1) -> list[int]:
    """Sample i's seed: seed + i * stride, wrapping modulo 2^64 (what a torch generator takes)."""
    return [(seed + int(i) * stride) % (SEED_MAX + 1) for i in indices]


def check_context(context) -> None:
    if context is not None and not isinstance(context, LanceContext):
        raise InputError(f"context must be a LanceContext from this library, got {type(context).__name__}")
