"""Wan2.2 VAE (z=48, 16x spatial, 4x temporal) as diffusers' `AutoencoderKLWan`, with Lance's latent conventions.

Latents handed to and returned by `LanceVAE` are in Lance's *normalised* space `z = (mu - mean) / std`
(per-channel Wan2.2 constants below); the network itself works on raw `mu`.

Tiling is off by default, as in the reference. The decoder already runs one latent frame at a time with a causal
feature cache, so memory grows with the frame size, not the frame count. Measured with the release-size VAE in bf16
on an H100 (weights 1.4 GB): decoding 121 frames at 480x848 peaks at ~4.8 GiB above the weights untiled and ~1.4 GiB
with `enable_tiling()` (256 px tiles, 192 stride); encoding 69 frames: ~1.9 / ~1.3 GiB. Both fit a 12 GB GPU.
Tiling blends overlapping tiles and so changes the pixels noticeably: keep it opt-in for tighter memory only.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from ..errors import CheckpointError, InputError
from .checkpoint import assert_no_meta, check_state_keys, load_torch_state_dict, materialize, private_copy
from .module_handle import ModuleHandle
from .vae_convs import skip_zero_frames

# Wan2.2 per-channel latent statistics (identical to diffusers' Wan2.2 `latents_mean` / `latents_std`).
WAN22_LATENT_STATS: dict[str, tuple[float, ...]] = {
    "mean": (
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ),
    "std": (
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ),
}
SPATIAL_FACTOR = 16
TEMPORAL_FACTOR = 4

# Wan-native -> diffusers renames. Block-level rules first; the inner rules apply to whatever they produced.
_BLOCK_RULES = (
    (re.compile(r"^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample|time_conv)\."), r"encoder.down_blocks.\1.downsampler.\2."),
    (re.compile(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\."), r"encoder.down_blocks.\1.resnets.\2."),
    (re.compile(r"^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample|time_conv)\."), r"decoder.up_blocks.\1.upsampler.\2."),
    (re.compile(r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\."), r"decoder.up_blocks.\1.resnets.\2."),
    (re.compile(r"^(encoder|decoder)\.middle\.0\."), r"\1.mid_block.resnets.0."),
    (re.compile(r"^(encoder|decoder)\.middle\.1\."), r"\1.mid_block.attentions.0."),
    (re.compile(r"^(encoder|decoder)\.middle\.2\."), r"\1.mid_block.resnets.1."),
    (re.compile(r"^(encoder|decoder)\.head\.0\."), r"\1.norm_out."),
    (re.compile(r"^(encoder|decoder)\.head\.2\."), r"\1.conv_out."),
    (re.compile(r"^(encoder|decoder)\.conv1\."), r"\1.conv_in."),
    (re.compile(r"^conv1\."), "quant_conv."),
    (re.compile(r"^conv2\."), "post_quant_conv."),
)
_RESIDUAL_RULES = (
    (re.compile(r"\.residual\.0\."), ".norm1."),
    (re.compile(r"\.residual\.2\."), ".conv1."),
    (re.compile(r"\.residual\.3\."), ".norm2."),
    (re.compile(r"\.residual\.6\."), ".conv2."),
    (re.compile(r"\.shortcut\."), ".conv_shortcut."),
)


def _convert_key(key: str) -> str:
    for pattern, replacement in _BLOCK_RULES:
        key, count = pattern.subn(replacement, key)
        if count:
            break
    for pattern, replacement in _RESIDUAL_RULES:
        key = pattern.sub(replacement, key)
    return key


def convert_wan_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan-native `Wan2.2_VAE.pth` state dict to diffusers `AutoencoderKLWan` names (tensors untouched)."""
    converted = {}
    for key, tensor in state.items():
        new_key = _convert_key(key)
        if new_key in converted:
            raise CheckpointError(f"VAE keys collide after renaming: {key!r} -> {new_key!r}")
        converted[new_key] = tensor
    return converted


def _architecture_from_weights(state: dict[str, torch.Tensor], source: Path) -> dict:
    """The sizes that differ between checkpoints, read from the (converted) weights themselves."""
    needed = ("encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight")
    missing = [key for key in needed if key not in state]
    if missing:
        raise CheckpointError(f"{source} is not a Wan2.2 VAE state dict: missing {missing} (after key conversion)")
    encoder_in = state["encoder.conv_in.weight"]  # [base_dim, 3*p*p, 3, 3, 3]
    decoder_out = state["decoder.conv_out.weight"]  # [3*p*p, decoder_base_dim, 3, 3, 3]
    z_dim = state["post_quant_conv.weight"].shape[0]
    in_channels = encoder_in.shape[1]
    patch_size = round((in_channels / 3) ** 0.5)
    if 3 * patch_size * patch_size != in_channels or decoder_out.shape[0] != in_channels:
        raise CheckpointError(f"{source}: encoder input has {in_channels} channels and decoder output "
                              f"{decoder_out.shape[0]}; expected 3*p*p for a Wan2.2 VAE (12 with p=2)")
    return dict(base_dim=encoder_in.shape[0], decoder_base_dim=decoder_out.shape[1], z_dim=z_dim,
                in_channels=in_channels, out_channels=in_channels, patch_size=patch_size)


def _build_module(arch: dict) -> AutoencoderKLWan:
    with torch.device("meta"):
        return AutoencoderKLWan(
            **arch, is_residual=True, scale_factor_temporal=TEMPORAL_FACTOR, scale_factor_spatial=SPATIAL_FACTOR,
            latents_mean=list(WAN22_LATENT_STATS["mean"]), latents_std=list(WAN22_LATENT_STATS["std"]),
        )


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> "LanceVAE":
    """Load `Wan2.2_VAE.pth` (Wan-native keys, weights-only unpickling) into a diffusers module on dtype/device."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"VAE weights not found: {path} (expected the release's Wan2.2_VAE.pth)")
    state = convert_wan_vae_keys(load_torch_state_dict(path))
    module = _build_module(_architecture_from_weights(state, path))
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    check_state_keys(path, expected, {key: tuple(t.shape) for key, t in state.items()})
    device = torch.device(device)
    # one tensor at a time, each a private copy (the mmapped file may be overwritten later), the mapping dropped
    materialize(module, ((key, private_copy(tensor, tensor.to(device=device, dtype=dtype)))
                         for key, tensor in _drain(state)))
    assert_no_meta(module, str(path))
    return LanceVAE(module.eval().requires_grad_(False))


def _drain(state: dict[str, torch.Tensor]):
    """Yield and forget the entries, so each mapped source tensor is released once it has been copied."""
    while state:
        yield state.popitem()


class LanceVAE(ModuleHandle):
    """Wan2.2 VAE with Lance's conventions: pixels [B,3,T,H,W] in [-1,1] <-> normalised latents [B,48,t,h,w]."""

    def __init__(self, module: AutoencoderKLWan):
        super().__init__(module)
        self.module.disable_tiling()
        skip_zero_frames(self.module)   # first frames without their zero padding (vae_convs.py)

    @property
    def z_dim(self) -> int:
        return int(self.module.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        return SPATIAL_FACTOR

    @property
    def temporal_factor(self) -> int:
        return TEMPORAL_FACTOR

    @property
    def tiling_enabled(self) -> bool:
        return bool(self.module.use_tiling)

    def enable_tiling(self, tile_sample_min_height: int = 256, tile_sample_min_width: int = 256,
                      tile_sample_stride_height: int = 192, tile_sample_stride_width: int = 192) -> None:
        """Spatially tiled encode/decode (lower memory, different pixels: outputs no longer match the reference)."""
        self.module.enable_tiling(tile_sample_min_height, tile_sample_min_width,
                                  tile_sample_stride_height, tile_sample_stride_width)

    def disable_tiling(self) -> None:
        self.module.disable_tiling()

    @contextlib.contextmanager
    def tiled(self, enabled: bool = True):
        """Tiled while inside (a memory fallback, or asked for); the previous setting afterwards. enabled=False
        leaves the setting as it is, so callers with a tiled flag need no second branch."""
        was = self.tiling_enabled
        if enabled:
            self.enable_tiling()
        try:
            yield
        finally:
            if enabled and not was:
                self.disable_tiling()

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(WAN22_LATENT_STATS["mean"], dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(WAN22_LATENT_STATS["std"], dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def _check_latent(self, latent: torch.Tensor, what: str) -> None:
        if latent.dim() != 5 or latent.shape[1] != self.z_dim:
            raise InputError(f"{what} must be [B, {self.z_dim}, t, h, w], got shape {tuple(latent.shape)}")

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw encoder mean -> Lance latent space, in float32."""
        self._check_latent(mu, "mu")
        mean, std = self._stats(mu)
        return (mu.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Lance latent space -> raw decoder input, in float32."""
        self._check_latent(z, "latent")
        mean, std = self._stats(z)
        return z.float() * std + mean

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B,3,T,H,W] in [-1,1] (T = 4k+1, H and W multiples of 16) -> (normalised mu, raw logvar), float32.

        logvar is not clamped (the reference does not clamp it either; diffusers' latent_dist would)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise InputError(f"VAE pixels must be [B, 3, T, H, W], got shape {tuple(pixels.shape)}")
        frames, height, width = pixels.shape[2:]
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise InputError(f"VAE input needs 4k+1 frames (causal 4x temporal compression), got {frames}")
        if height % self.spatial_factor or width % self.spatial_factor or height == 0 or width == 0:
            raise InputError(f"VAE input height/width must be positive multiples of {self.spatial_factor}, "
                             f"got {height}x{width}")
        x = pixels.to(device=self.device, dtype=self.dtype)
        moments = self.module.encode(x).latent_dist.parameters
        mu, logvar = moments.float().chunk(2, dim=1)
        return self.normalize(mu), logvar

    @torch.no_grad()
    def decode(self, z_normalized: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,48,t,h,w] -> pixels [B,3,4(t-1)+1,16h,16w] in [-1,1], float32."""
        raw = self.denormalize(z_normalized).to(device=self.device, dtype=self.dtype)
        pixels = self.module.decode(raw).sample
        return pixels.float().clamp(-1.0, 1.0)

    def sample_posterior(self, mu_normalized: torch.Tensor, logvar: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """The reference's condition sample: noise is added in *normalised* space but scaled by the *raw* std
        exp(logvar/2) (no logvar clamp). Kept for parity; the plain `mu_normalized` is the deterministic choice."""
        self._check_latent(mu_normalized, "mu_normalized")
        if logvar.shape != mu_normalized.shape:
            raise InputError(f"logvar shape {tuple(logvar.shape)} != mu shape {tuple(mu_normalized.shape)}")
        noise_device = generator.device if generator is not None else mu_normalized.device
        noise = torch.randn(mu_normalized.shape, generator=generator, dtype=torch.float32, device=noise_device)
        std = torch.exp(0.5 * logvar.float())
        return mu_normalized.float() + std * noise.to(mu_normalized.device)
