"""Model configuration, read from the release files (never hard-coded).

`llm_config.json` gives the LLM shape, rope settings, special-token ids and the vision-grid facts used by the
position scan; `Qwen2.5-VL-ViT/config.json` gives the ViT. Model-level constants that the release passes as
script arguments (not stored in any file) live in `LanceConstants` with the release values.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..io.validation import is_int
from .checkpoint import read_json

log = logging.getLogger(__name__)


QWEN25_VL_MROPE_SECTION = (16, 24, 24)  # Qwen2.5-VL-3B, head_dim 128
MAX_LAYERS = 256  # the release has 36; a larger count is a corrupt config (building it would take minutes)


class ConfigFields:
    """Typed, range-checked reads of one JSON config object; errors name the file and the field."""

    def __init__(self, raw: dict, source: str, where: str = ""):
        self.raw, self.source, self.where = raw, source, where

    def _fail(self, key: str, expected: str):
        value = self.raw.get(key)
        raise CheckpointError(f"{self.source}: field {self.where + key!r} is {value!r} ({type(value).__name__}); "
                              f"expected {expected}")

    def int(self, key: str, minimum: int, maximum: int) -> int:
        if key not in self.raw:
            raise CheckpointError(f"{self.source}: required field {self.where + key!r} is missing")
        value = self.raw[key]
        if not is_int(value) or not minimum <= value <= maximum:
            self._fail(key, f"an integer in {minimum}..{maximum}")
        return int(value)

    def float(self, key: str, above: float, maximum: float, default: float | None = None) -> float:
        """A finite number in (above, maximum]."""
        if key not in self.raw and default is not None:
            return default
        if key not in self.raw:
            raise CheckpointError(f"{self.source}: required field {self.where + key!r} is missing")
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not above < value <= maximum:
            self._fail(key, f"a number in ({above}, {maximum}]")
        return float(value)

    def token_id(self, key: str, vocab: int) -> int | None:
        """Optional token id (checked against the tokenizer later); must index the vocabulary when present."""
        if self.raw.get(key) is None:
            return None
        return self.int(key, 0, vocab - 1)


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
    max_positions: int | None = None   # max_position_embeddings: bounds prompt + generated tokens
    hidden_act: str = "silu"
    constants: LanceConstants = field(default_factory=LanceConstants)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "llm_config.json") -> "LLMConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        field_ = ConfigFields(raw, source)
        hidden = field_.int("hidden_size", 1, 65536)
        heads = field_.int("num_attention_heads", 1, 1024)
        if hidden % heads:
            raise CheckpointError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        kv_heads = field_.int("num_key_value_heads", 1, heads)
        if heads % kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = field_.int("head_dim", 1, 1024) if raw.get("head_dim") else hidden // heads
        vocab = field_.int("vocab_size", 1, 1 << 22)
        rope = raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: field 'rope_scaling' must be an object, got {rope!r}")
        section = _qwen_default(rope, "mrope_section", QWEN25_VL_MROPE_SECTION if head_dim == 128 else None, source,
                                "rope_scaling.")
        if (not isinstance(section, (list, tuple)) or len(section) != 3 or not all(is_int(s) and s >= 0 for s in section)
                or sum(section) * 2 != head_dim):
            raise CheckpointError(f"{source}: field 'rope_scaling.mrope_section' is {section!r}; expected 3 integers "
                                  f"summing to head_dim/2 = {head_dim // 2}")
        vision = raw.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise CheckpointError(f"{source}: field 'vision_config' must be an object, got {vision!r}")
        vision_field = ConfigFields(vision, source, "vision_config.")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (Lance uses 'silu')")
        return cls(
            hidden_size=hidden,
            intermediate_size=field_.int("intermediate_size", 1, 1 << 18),
            num_layers=field_.int("num_hidden_layers", 1, MAX_LAYERS),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            rms_norm_eps=field_.float("rms_norm_eps", 0.0, 1.0, default=1e-6),
            rope_theta=field_.float("rope_theta", 0.0, 1e12),
            mrope_section=tuple(int(s) for s in section),
            spatial_merge_size=(vision_field.int("spatial_merge_size", 1, 16) if "spatial_merge_size" in vision
                                else _qwen_default(vision, "spatial_merge_size", 2, source, "vision_config.")),
            tokens_per_second=(vision_field.float("tokens_per_second", 0.0, 1000.0) if "tokens_per_second" in vision
                               else float(_qwen_default(vision, "tokens_per_second", 2, source, "vision_config."))),
            video_token_id=field_.token_id("video_token_id", vocab),
            vision_start_token_id=field_.token_id("vision_start_token_id", vocab),
            max_positions=field_.int("max_position_embeddings", 1, 1 << 24) if "max_position_embeddings" in raw else None,
            hidden_act=act,
        )

    @classmethod
    def from_file(cls, path: Path) -> "LLMConfig":
        return cls.from_dict(read_json(path), source=str(path))
