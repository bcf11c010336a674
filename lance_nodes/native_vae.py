"""The loaded release's Wan2.2 VAE as a core `VAE`, for VAEDecode / VAEEncode (and their tiled variants) in native
workflows: no second file in models/vae, no second copy of the weights.

It is a `comfy.sd.VAE` (core nodes call its methods and read its ratios), but every encode and decode is a call into
the library's pipeline: the session's lock, memory estimate, interrupt points and out-of-memory fallback apply, and
VAEDecode gives exactly Lance Decode's pixels. Its `patcher` is the release's one ModelPatcher (two patchers over the
same weights would each think they own them).

Low VRAM, as with core's own VAE: a decode or encode loads nothing but the VAE (the library tells the host hook the
call is VAE-only, so the release's patcher - LLM and ViT included - is not loaded for it, and core may unload it to
make room); VAE weights that core's partial load left in RAM visit the GPU for the call only; out of memory untiled,
the library retries tiled after freeing, then raises a clear OutOfMemory naming the remedies ComfyUI offers. The
tiled variants are not retried.
"""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.sd

from . import runtime
from .errors import input_error, node_errors


class _SkipEmptyVaeWarning(logging.Filter):
    """core.VAE(sd={}) sets every default attribute of this ComfyUI version and warns that no weights were found;
    here that is intended (the weights are the library's), so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No VAE weights detected" not in record.getMessage()


class LanceCoreVAE(comfy.sd.VAE):
    def __init__(self, model):
        root = logging.getLogger()
        quiet = _SkipEmptyVaeWarning()
        root.addFilter(quiet)
        try:
            super().__init__(sd={})
        finally:
            root.removeFilter(quiet)
        self.lance = model                       # its Loader settings are named in out-of-memory errors
        pipe = self.pipe = model.pipe
        vae = pipe.vae
        self.first_stage_model = vae.module     # get_sd(), model_size(): the library's module itself
        self.patcher = model.patcher
        self.device, self.vae_dtype = pipe.device, vae.dtype
        self.output_device = comfy.model_management.intermediate_device()
        self.latent_channels, self.latent_dim = vae.z_dim, 3
        step, side = vae.temporal_factor, vae.spatial_factor
        # core's Wan2.2 conventions: causal time axis (1 + step * (t - 1) frames), side x side pixels per latent
        self.upscale_ratio = (lambda t: max(0, t * step - (step - 1)), side, side)
        self.downscale_ratio = (lambda t: max(0, (t + step - 1) // step), side, side)
        self.upscale_index_formula = self.downscale_index_formula = (step, side, side)

    @node_errors
    def decode(self, samples_in, vae_options=None):
        """LATENT samples [B, C, t, h, w] -> IMAGE frames [B, T, H, W, 3] (VAEDecode flattens the batch)."""
        return self._decode(samples_in, tiled=False)

    @node_errors
    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """VAEDecodeTiled: the library's spatial tiling (its own tile size; every frame is decoded causally anyway)."""
        return self._decode(samples, tiled=True)

    @node_errors
    def encode(self, pixel_samples):
        """IMAGE [T, H, W, 3] (one image, or a video's frames) -> LATENT samples [1, C, t, h, w]."""
        return self._encode(pixel_samples, tiled=False)

    @node_errors
    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self._encode(pixel_samples, tiled=True)

    def _decode(self, samples, tiled: bool):
        return runtime.decode(self.lance, runtime.check_latent({"samples": samples}, "samples"), tiled)

    def _encode(self, pixels, tiled: bool):
        """As core's Wan2.2 VAE: the frames are center-cropped to whole latent cells and only the first 4k+1
        frames are encoded."""
        frames = runtime.check_images(pixels, "pixels")
        step, side = self.pipe.vae.temporal_factor, self.pipe.vae.spatial_factor
        if min(frames.shape[1:3]) < side:
            raise input_error(f"pixels: {frames.shape[2]}x{frames.shape[1]} px is smaller than one latent cell "
                              f"({side}x{side} px)")
        frames = self.vae_encode_crop_pixels(frames)
        frames = frames[:(frames.shape[0] - 1) // step * step + 1]
        return runtime.encode(self.lance, frames, tiled)

