"""Model configuration, read from the release files (never hard-coded).

`llm_config.json` gives the LLM shape, rope settings, special-token ids and the vision-grid facts used by the
position scan; `Qwen2.5-VL-ViT/config.json` gives the ViT. Model-level constants that the release passes as
script arguments (not stored in any file) live in `LanceConstants` with the release values.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import read_json
from .errors import CheckpointError

log = logging.getLogger(__name__)


QWEN25_VL_MROPE_SECTION = (16, 24, 24)  # Qwen2.5-VL-3B, head_dim 128


def _qwen_default(section: dict, key: str, default, source: str, where: str = ""):
    """The reference never injects these fields, so they must come from the file; a missing one falls back to the
    Qwen2.5-VL value with a warning (or is an error where no such value applies)."""
    if key in section:
        return section[key]
    if default is None:
        raise CheckpointError(f"{source}: required field {where}{key} is missing")
    log.warning("%s: %s%s missing, using the Qwen2.5-VL value %s", source, where, key, default)
    return default


@dataclass(frozen=True)
class LanceConstants:
    """Script-level settings of the reference (inference_lance.sh); identical for every release checkpoint."""

    latent_channels: int = 48          # Wan2.2 z_dim; checked against the VAE weights at load
    max_latent_size: int = 64          # latent position table is 64 x 64 per frame
    max_num_frames: int = 121          # -> 31 latent frames
    vae_spatial_factor: int = 16
    vae_temporal_factor: int = 4
    timestep_embed_dim: int = 256      # sinusoidal width fed to time_embedder.mlp.0

    @property
    def max_latent_frames(self) -> int:
        return (self.max_num_frames - 1) // self.vae_temporal_factor + 1


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    spatial_merge_size: int
    tokens_per_second: float
    video_token_id: int | None        # checked against the tokenizer when the file has it
    vision_start_token_id: int | None
    hidden_act: str = "silu"
    constants: LanceConstants = field(default_factory=LanceConstants)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "llm_config.json") -> "LLMConfig":
        def need(key, where=raw, where_name=""):
            if key not in where:
                raise CheckpointError(f"{source}: required field {where_name}{key!r} is missing")
            return where[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        if hidden % heads:
            raise CheckpointError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        section = tuple(int(s) for s in _qwen_default(raw.get("rope_scaling") or {}, "mrope_section",
                                                      QWEN25_VL_MROPE_SECTION if head_dim == 128 else None, source,
                                                      "rope_scaling."))
        if len(section) != 3 or sum(section) * 2 != head_dim:
            raise CheckpointError(f"{source}: rope_scaling.mrope_section {list(section)} must have 3 entries summing to head_dim/2 = {head_dim // 2}")
        vision = raw.get("vision_config") or {}
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (Lance uses 'silu')")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(need("num_key_value_heads")),
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(need("rope_theta")),
            mrope_section=section,
            spatial_merge_size=int(_qwen_default(vision, "spatial_merge_size", 2, source, "vision_config.")),
            tokens_per_second=float(_qwen_default(vision, "tokens_per_second", 2, source, "vision_config.")),
            video_token_id=raw.get("video_token_id"),
            vision_start_token_id=raw.get("vision_start_token_id"),
            hidden_act=act,
        )

    @classmethod
    def from_file(cls, path: Path) -> "LLMConfig":
        return cls.from_dict(read_json(path), source=str(path))
