"""Source media -> what a request conditions on: the VAE posterior (clean condition latents) and the ViT
embeddings, each through the session's encode store (a repeated source encodes nothing again)."""
from __future__ import annotations

from typing import Callable

import torch

from .memory import Estimate, vae_encode_bytes
from .session import LanceSession


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
