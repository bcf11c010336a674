"""One whole generation run: noise, the up-front memory estimate, sampling, decoding and the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DecodeOutOfMemory, InputError
from ..io.validation import require_callable, require_finite_tensor
from ..runtime.memory import Estimate, forward_activation_bytes, kv_cache_bytes, vae_decode_bytes
from ..runtime.session import LanceSession
from .branches import BranchEngine
from .context import LanceContext, Turn
from .request import GenerationInputs, LatentGrid, tokens_to_video
from .sampler import FlowSampler, SamplerOptions, StepInfo
from .settings import MAX_BATCH, GenerationSettings


@dataclass
class GenerationResult:
    latents: torch.Tensor          # [B, C, t, h, w] normalized (model space), fp32, CPU
    raw_latents: torch.Tensor      # [B, C, t, h, w] un-normalized Wan2.2 latents (ComfyUI LATENT "samples")
    frames: torch.Tensor | None    # [B, T, H, W, 3] float in 0..1, CPU
    context: LanceContext

    def comfy_latent(self) -> torch.Tensor:
        return self.raw_latents


def run(session: LanceSession, task: str, request: str, inputs: GenerationInputs, settings: GenerationSettings,
        noise: torch.Tensor | None = None, observer: Callable[[StepInfo], None] | None = None) -> GenerationResult:
    """Sample (seeds per `settings.seeds()` unless `noise` [B, N, C] is given), decode, extend the context."""
    if not isinstance(inputs, GenerationInputs):
        raise InputError(f"inputs must come from a prepare_* method, got {type(inputs).__name__}")
    require_callable(observer, "observer")
    if settings.context is not None:
        settings.context.check_model(session.model_id)
    options = settings.sampler_options()
    channels = session.config.constants.latent_channels
    noise = initial_noise(inputs, settings.seeds(), channels) if noise is None else checked_noise(noise, inputs, channels)
    session.check(estimate(session, inputs, options, noise.shape[0], settings.decode))
    tokens = sample(session, inputs, options, noise, step_hook(inputs.target, settings, observer), settings.cancel)
    latents = tokens_to_video(tokens.cpu(), inputs.target)
    sampled = GenerationResult(latents, session.vae.denormalize(latents).cpu(), None,
                               settings.context or LanceContext(session.model_id))
    frames = decode_sampled(session, sampled, settings.cancel) if settings.decode else None
    context = sampled.context.append(Turn(task, request, media=frames[0] if frames is not None else None))
    return GenerationResult(sampled.latents, sampled.raw_latents, frames, context)


def initial_noise(inputs: GenerationInputs, seeds: list[int], channels: int) -> torch.Tensor:
    """[B, N, C] target noise. As the reference: one CPU generator per sample seeded with its seed, drawing
    randn(all latent tokens of the sequence, C) and keeping the target block's rows."""
    seq = inputs.seq
    total = sum(b.tokens for b in seq.blocks if b.role != "vit")
    offset = sum(b.tokens for b in seq.blocks if b.role == "source" and b.start < seq.target.start)
    rows = []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        rows.append(torch.randn(total, channels, generator=generator)[offset:offset + inputs.target.tokens])
    return torch.stack(rows)


def checked_noise(noise, inputs: GenerationInputs, channels: int) -> torch.Tensor:
    require_finite_tensor(noise, "noise")
    if noise.dim() != 3 or noise.shape[1:] != (inputs.target.tokens, channels) or not 1 <= noise.shape[0] <= MAX_BATCH:
        raise InputError(f"noise must be [B, {inputs.target.tokens}, {channels}] with B in 1..{MAX_BATCH}, "
                         f"got shape {tuple(noise.shape)}")
    return noise


def sample(session: LanceSession, inputs: GenerationInputs, options: SamplerOptions, noise: torch.Tensor,
           on_step: Callable[[StepInfo], None] | None, cancel: Callable[[], bool] | None) -> torch.Tensor:
    """The library sampler over the session's LLM, reusing stored prefixes. -> final tokens [B, N, C] fp32."""
    engine = BranchEngine(session.llm, session.prefixes, session.weights_version)
    with session.running(session.llm, cancel), torch.inference_mode():
        return FlowSampler(engine, inputs, options, noise.shape[0]).sample(noise, on_step, cancel)


def estimate(session: LanceSession, inputs: GenerationInputs, options: SamplerOptions, batch: int,
             decode_too: bool) -> Estimate:
    """Lower-bound bytes of the sampling stage (KV cache of the guided branches + the largest forward) and of the
    decode stage (tiled: a decode that does not fit untiled falls back to tiles, so that is the least it needs)."""
    cfg, seq = session.config, inputs.seq
    target = seq.target_split
    rows = batch * min(options.guidance.branch_count(options.timesteps), 2)
    longest_prefill = max((s.length for s in seq.splits if s.end <= target.start), default=0)
    result = Estimate()
    result.add("sampling", "KV cache", kv_cache_bytes(cfg, rows, target.end, session.dtype))
    result.add("sampling", "activations", forward_activation_bytes(cfg, max(longest_prefill, batch * target.length),
                                                                   session.dtype))
    result.add("sampling", "LLM weights", session.stage_weights(session.llm))
    if decode_too:
        add_decode(session, result, inputs.target, batch, tiled=True)
    return result


def add_decode(session: LanceSession, estimate_: Estimate, grid: LatentGrid, batch: int,
               tiled: bool | None = None) -> None:
    """The decode stage of `grid` latents, tiled or not as the VAE is set (or as `tiled` says)."""
    c, vae = session.config.constants, session.vae
    estimate_.add("VAE decode", "VAE working set and output", vae_decode_bytes(
        int(vae.module.config.decoder_base_dim), c.vae_temporal_factor * (grid.frames - 1) + 1,
        grid.height * c.vae_spatial_factor, grid.width * c.vae_spatial_factor, batch, vae.dtype,
        vae.tiling_enabled if tiled is None else tiled, c.vae_temporal_factor))
    estimate_.add("VAE decode", "VAE weights", session.stage_weights(vae.module))


def step_hook(grid: LatentGrid, settings: GenerationSettings, observer):
    if settings.on_step is None and observer is None:
        return None

    def hook(info: StepInfo) -> None:
        if observer is not None:
            observer(info)
        if settings.on_step is not None:
            settings.on_step(info.step, info.total, tokens_to_video(info.x0.cpu(), grid))
    return hook


# -- decoding -----------------------------------------------------------------------------------------------
def decode_sampled(session: LanceSession, sampled: GenerationResult, cancel) -> torch.Tensor:
    """Decode the latents a run sampled. Out of memory does not lose them: what sampling left on the device is
    freed and the decode is retried with the VAE tiled; if that fails too, DecodeOutOfMemory carries `sampled`."""
    def give_up(tried: str) -> DecodeOutOfMemory:
        facts = f"sampling finished, but decoding its latents ran out of memory on {session.device}, {tried}"
        return DecodeOutOfMemory(f"{facts}; the latents are kept (this error's `result`, the node's saved LATENT): "
                                 f"decode them later, tiled, or on a larger device", sampled, facts)
    return session.tiled_fallback(lambda: decode(session, sampled.latents, cancel), "VAE decode", give_up)


def decode_latents(session: LanceSession, latents: torch.Tensor, cancel: Callable[[], bool] | None,
                   tiled: bool) -> torch.Tensor:
    """A decode on its own (`tiled` as asked): out of memory untiled, it is retried tiled after freeing; a second
    failure is an OutOfMemory saying what to do."""
    with session.vae.tiled(tiled):
        return session.tiled_fallback(lambda: decode(session, latents, cancel), "VAE decode")


def decode(session: LanceSession, latents: torch.Tensor, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Normalized latents [B, C, t, h, w] -> frames [B, T, H, W, 3] in 0..1 (CPU, fp32), with the VAE as it is set
    (tiled or not); `cancel` is polled before every latent frame."""
    check_latents(session, latents, "latents")
    require_callable(cancel, "cancel")
    estimate_ = Estimate()
    add_decode(session, estimate_, LatentGrid(*latents.shape[2:]), latents.shape[0])
    session.check(estimate_)
    with session.running(session.vae.module, cancel), torch.inference_mode():
        pixels = session.vae.decode(latents)
    return ((pixels.cpu() + 1) / 2).permute(0, 2, 3, 4, 1).contiguous()


def check_latents(session: LanceSession, latents, what: str) -> None:
    """A latent batch the model can decode: [B, z, t, h, w] within the model's sizes, finite."""
    c, z = session.config.constants, session.vae.z_dim
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor, got {type(latents).__name__}")
    shape = tuple(latents.shape)
    if latents.dim() != 5 or shape[1] != z:
        raise InputError(f"{what} must be [B, {z}, t, h, w], got shape {shape}")
    b, _, t, h, w = shape
    if not (1 <= b <= MAX_BATCH and 1 <= t <= c.max_latent_frames and 1 <= h <= c.max_latent_size
            and 1 <= w <= c.max_latent_size):
        raise InputError(f"{what} of shape {shape} is outside what the model supports: batch 1..{MAX_BATCH}, "
                         f"1..{c.max_latent_frames} latent frames ({c.max_num_frames} video frames) and "
                         f"1..{c.max_latent_size} latent rows/columns ({c.max_latent_size * c.vae_spatial_factor} px)")
    require_finite_tensor(latents, what)  # after the size check: a huge tensor is refused before it is scanned
