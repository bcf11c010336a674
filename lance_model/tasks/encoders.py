"""Source media -> what a request conditions on: the VAE posterior (clean condition latents) and the ViT
embeddings, each through the session's encode store (a repeated source encodes nothing again)."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError
from ..io.media import check_frame_size
from ..io.validation import require_finite_tensor, require_unit_range
from ..runtime.memory import Estimate, vae_encode_bytes
from ..runtime.session import LanceSession


def condition_latent(session: LanceSession, pixels: torch.Tensor, *, seed: int = 0, sampling: str = "mean",
                     cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """VAE pixels [3, T, H, W] -> normalized condition latent [1, C, t, h, w] on the CPU: the posterior mean, or
    (sampling "reference") the official posterior sample drawn with `seed`."""
    mu, logvar = session.encodings.get_or_compute("vae", pixels, encoding_context(session),
                                                  lambda: _vae_encode(session, pixels, cancel))
    if sampling == "reference":
        generator = torch.Generator("cpu").manual_seed(seed)
        return session.vae.sample_posterior(mu.cpu(), logvar.cpu(), generator)
    return mu.cpu()


def raw_latents(session: LanceSession, frames: torch.Tensor, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Frames [T, H, W, 3] in 0..1 (checked by check_frames) -> un-normalized latents [1, C, t, h, w] on the CPU:
    the posterior mean in the raw Wan2.2 space ComfyUI's LATENT uses."""
    pixels = frames.detach().to("cpu", torch.float32).permute(3, 0, 1, 2) * 2 - 1
    return session.vae.denormalize(condition_latent(session, pixels.contiguous(), cancel=cancel))


def check_frames(session: LanceSession, frames, what: str) -> None:
    """Frames the VAE encodes as they are: [T, H, W, 3], T = 4k+1, H and W positive multiples of the spatial
    factor, within the model's sizes, finite and in 0..1."""
    c = session.config.constants
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
        raise InputError(f"{what} must be a float tensor [T, H, W, 3] in 0..1, got "
                         f"{type(frames).__name__ if not isinstance(frames, torch.Tensor) else frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise InputError(f"{what} must be [T, H, W, 3] (RGB frames), got shape {tuple(frames.shape)}")
    count, height, width = frames.shape[:3]
    check_frame_size(height, width, what)
    step, side = c.vae_temporal_factor, c.vae_spatial_factor
    if count < 1 or (count - 1) % step or count > c.max_num_frames:
        raise InputError(f"{what}: the VAE encodes {step}k+1 frames (1, {step + 1}, {2 * step + 1}, ...) up to "
                         f"{c.max_num_frames}, got {count}")
    largest = c.max_latent_size * side
    if not (0 < height <= largest and 0 < width <= largest) or height % side or width % side:
        raise InputError(f"{what}: height and width must be multiples of {side} up to {largest} px, got "
                         f"{width}x{height}")
    require_finite_tensor(frames, what)
    require_unit_range(frames, what)


def vit_embeddings(session: LanceSession, pixels: torch.Tensor, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """ViT pixels [3, T, H, W] -> merged embeddings [tokens, H] on the execution device."""
    embeds, = session.encodings.get_or_compute("vit", pixels, encoding_context(session),
                                               lambda: (_vit_embed(session, pixels, cancel),))
    return embeds


def _vae_encode(session: LanceSession, pixels: torch.Tensor, cancel) -> tuple[torch.Tensor, torch.Tensor]:
    frames, height, width = pixels.shape[1:]
    vae = session.vae
    session.check(Estimate()
                  .add("VAE encode", "VAE working set", vae_encode_bytes(int(vae.module.config.base_dim), frames, height,
                                                                         width, vae.dtype, vae.tiling_enabled))
                  .add("VAE encode", "VAE weights", session.stage_weights(vae.module)))
    with session.running(vae.module, cancel), torch.inference_mode():
        return vae.encode(pixels.unsqueeze(0))


def _vit_embed(session: LanceSession, pixels: torch.Tensor, cancel) -> torch.Tensor:
    with session.running(session.vit.module, cancel):
        return session.vit.embed(pixels)


def encoding_context(session: LanceSession) -> tuple:
    """What a stored encoding depends on besides the pixels: the dtype, the VAE tiling and the weights."""
    return (str(session.dtype), session.vae.tiling_enabled, repr(session.weights_version()))
