"""Lance's sampling rules on core ComfyUI hooks: the exact flow schedule (`lance_flow` scheduler), the official
per-seed noise (a NOISE object for SamplerCustomAdvanced), and CFG interval + renorm (model patches, so they
work under KSampler and CFGGuider alike). The math is the library's; this module only connects it."""
from __future__ import annotations

from dataclasses import replace

import comfy.patcher_extension
import comfy.samplers
import torch

from .errors import input_error
from .library import lance_model
from .native_model import request_of

SCHEDULER = "lance_flow"


# ---------------------------------------------------------------- schedule
def lance_flow_sigmas(model_sampling, steps: int) -> torch.Tensor:
    """Lance's t_i (= sigma_i) for the model's shift, exactly: flow_timesteps(steps, shift)."""
    return lance_model.tasks.sampler.flow_timesteps(int(steps), float(model_sampling.shift))


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
        samples = input_latent["samples"]
        inputs = self.branch.inputs
        grid = inputs.target
        expected = (samples.shape[0], samples.shape[1], grid.frames, grid.height, grid.width)
        if samples.ndim != 5 or tuple(samples.shape) != expected:
            raise input_error(f"latent_image: shape {tuple(samples.shape)} does not match the Lance conditioning's "
                              f"target {expected}; use the LATENT output of the same Lance Conditioning node")
        indices = input_latent.get("batch_index") or list(range(samples.shape[0]))
        seeds = lance_model.tasks.settings.sample_seeds(self.seed, indices)
        noise = lance_model.tasks.generation.initial_noise(inputs, seeds, samples.shape[1])
        return lance_model.tasks.request.tokens_to_video(noise, grid)


# ---------------------------------------------------------------- guidance
def guidance_options(scale: float, low: float, high: float, renorm: str, renorm_min: float, image_scale: float = 1.0):
    """The library's GuidanceOptions, validated (its InputError names the input)."""
    options = lance_model.tasks.guidance.GuidanceOptions(float(scale), (float(low), float(high)), renorm, float(renorm_min),
                                                   image_scale=float(image_scale))
    options.validate()
    return options


def guided(cond, uncond, image_uncond, options) -> torch.Tensor:
    """The library's guided velocity (text CFG, image CFG when `image_uncond` is given, renorm) on core's
    [B, C, t, h, w] sigma*v values: the combination is linear and the renorm ratio does not depend on sigma."""
    request = lance_model.tasks.request
    b, _, t, h, w = cond.shape
    tokens = [None if v is None else request.video_to_tokens(v) for v in (cond, uncond, image_uncond)]
    return request.tokens_to_video(lance_model.tasks.guidance.guided_velocity(*tokens, options), request.LatentGrid(t, h, w))


class GuidedRenorm:
    """sampler_cfg_function: plain CFG on core's sigma*v values, then Lance's renorm. With cfg 1 (outside the
    interval) it returns the conditional prediction unchanged."""

    def __init__(self, options):
        self.options = options

    def __call__(self, args: dict) -> torch.Tensor:
        cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]
        if args.get("input_uncond") is None:
            return cond
        return guided(cond, uncond, None, replace(self.options, scale=float(scale)))  # any sampler cfg


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
    options = guidance_options(1.0, low, high, renorm, renorm_min)
    patched = model.clone()
    patched.set_model_sampler_cfg_function(GuidedRenorm(options))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "lance_cfg_interval",
                                 GuidanceInterval(low, high))
    return patched


class LanceEditGuider(comfy.samplers.CFGGuider):
    """Text + image CFG for edits, exactly the library sampler's: v_uu + g_t (v_c - v_u) + g_v (v_u - v_uu)
    inside the interval, then the renorm; only the positive forward runs outside it. image_cfg 1 is plain text
    CFG (no image-negative forward)."""

    def set_guidance(self, positive, negative, image_negative, options) -> None:
        self.options = options
        conds = {"positive": positive, "negative": negative}
        if options.image_guided:
            conds["image_negative"] = image_negative
        self.inner_set_conds(conds)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma, g = float(timestep.flatten()[0]), self.options
        names = ["positive"]
        if g.active(sigma):
            names += ["negative", "image_negative"] if g.image_guided else ["negative"]
        denoised = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds.get(n) for n in names], x, timestep,
                                                  model_options)
        if len(denoised) == 1:
            return denoised[0]
        sigma_v = [x - d for d in denoised] + [None] * (3 - len(denoised))   # x0 = x - sigma * v
        return x - guided(*sigma_v, g)


def edit_guider(model, positive, negative, image_negative, options) -> LanceEditGuider:
    if options.image_guided and request_of(image_negative, "image_negative").kind != "image_uncond":
        raise input_error("image_negative: this conditioning has no image or video input (image CFG is for "
                          "edits); connect the image_negative of an edit's Lance Conditioning or set image_cfg to 1")
    for name, cond in (("positive", positive), ("negative", negative)):
        request_of(cond, name)
    guider = LanceEditGuider(model)
    guider.set_guidance(positive, negative, image_negative, options)
    return guider
