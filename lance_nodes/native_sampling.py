"""Lance's sampling rules on core ComfyUI hooks: the exact flow schedule (`lance_flow` scheduler), the official
per-seed noise (a NOISE object for SamplerCustomAdvanced), and CFG interval + renorm (model patches, so they
work under KSampler and CFGGuider alike). The math is the library's; this module only connects it."""
from __future__ import annotations

import comfy.patcher_extension
import comfy.samplers
import torch

from .library import input_error
from .native_model import library_module

SCHEDULER = "lance_flow"


# ---------------------------------------------------------------- schedule
def lance_flow_sigmas(model_sampling, steps: int) -> torch.Tensor:
    """Lance's t_i (= sigma_i) for the model's shift, exactly: flow_timesteps(steps, shift)."""
    return library_module("sampler").flow_timesteps(int(steps), float(model_sampling.shift))


def register_scheduler() -> None:
    """Add `lance_flow` to core's scheduler registry; KSampler lists it (its SCHEDULERS is the same list)."""
    if SCHEDULER not in comfy.samplers.SCHEDULER_HANDLERS:
        comfy.samplers.SCHEDULER_HANDLERS[SCHEDULER] = comfy.samplers.SchedulerHandler(lance_flow_sigmas)
    if SCHEDULER not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(SCHEDULER)


# ---------------------------------------------------------------- noise
class LanceNoise:
    """The official noise of a request: per sample one CPU generator seeded seed + batch index, drawing
    randn(all latent tokens, C) and keeping the target rows (library `initial_noise`)."""

    def __init__(self, seed: int, branch):
        self.seed = int(seed)
        self.branch = branch

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        gen = library_module("generation")
        samples = input_latent["samples"]
        inputs = self.branch.inputs
        grid = inputs.target
        expected = (samples.shape[0], samples.shape[1], grid.frames, grid.height, grid.width)
        if samples.ndim != 5 or tuple(samples.shape) != expected:
            raise input_error(f"latent_image: shape {tuple(samples.shape)} does not match the Lance conditioning's "
                              f"target {expected}; use the LATENT output of the same Lance Conditioning node")
        indices = input_latent.get("batch_index") or list(range(samples.shape[0]))
        noise = gen.initial_noise(inputs, [self.seed + int(i) for i in indices], samples.shape[1])
        return gen.tokens_to_video(noise, grid)


# ---------------------------------------------------------------- guidance
class GuidedRenorm:
    """sampler_cfg_function: plain CFG on core's sigma*v values, then Lance's renorm (the norm ratio does not
    depend on sigma). With cfg 1 (outside the interval) it returns the conditional prediction unchanged."""

    def __init__(self, renorm: str, renorm_min: float):
        self.renorm, self.renorm_min = renorm, float(renorm_min)

    def __call__(self, args: dict) -> torch.Tensor:
        cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]
        if args.get("input_uncond") is None:
            return cond
        guided = uncond + scale * (cond - uncond)
        gen, sampler = library_module("generation"), library_module("sampler")
        b, _, t, h, w = guided.shape
        renormed = sampler.renormalize(gen.video_to_tokens(guided), gen.video_to_tokens(cond), self.renorm,
                                       self.renorm_min)
        return gen.tokens_to_video(renormed, gen.LatentGrid(t, h, w))


class GuidanceInterval:
    """PREDICT_NOISE wrapper: guidance only for lo < sigma <= hi; elsewhere cfg is 1, so core runs no negative
    forward there (as the official sampler skips its unconditional branch)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high)

    def __call__(self, executor, *args, **kwargs):
        sigma = float(args[1].flatten()[0])
        guider = executor.class_obj
        if self.low < sigma <= self.high or not hasattr(guider, "cfg"):
            return executor(*args, **kwargs)
        saved = guider.cfg
        guider.cfg = 1.0
        try:
            return executor(*args, **kwargs)
        finally:
            guider.cfg = saved


def apply_guidance(model, low: float, high: float, renorm: str, renorm_min: float):
    """A clone of the MODEL with Lance's CFG interval and renorm."""
    if not 0.0 <= low <= high <= 1.0:
        raise input_error(f"cfg_interval: must satisfy 0 <= start <= end <= 1, got ({low}, {high})")
    if renorm not in library_module("sampler").RENORM_TYPES:
        raise input_error(f"cfg_renorm: expected one of {library_module('sampler').RENORM_TYPES}, got {renorm!r}")
    patched = model.clone()
    patched.set_model_sampler_cfg_function(GuidedRenorm(renorm, renorm_min))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "lance_cfg_interval",
                                 GuidanceInterval(low, high))
    return patched
