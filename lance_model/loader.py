"""Build modules on the meta device from the release configs and stream the weights into them."""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .attention import Attention
from .checkpoint import (ReleasePaths, assert_no_meta, check_state_keys, materialize, safetensors_keys,
                         stream_safetensors)
from .config import LLMConfig
from .llm import LanceLLM, MoTDecoderLayer
from .ops import TorchOps
from .size_check import check_elements, check_layers, file_elements, layer_count, numel

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("vit_model.",)      # the ViT is loaded from Qwen2.5-VL-ViT/ (see vit.py)
IGNORED_KEYS = ("latent_pos_embed.pos_embed",)  # fixed sin-cos table, recomputed (positions.py)
LAYER_PREFIX = "language_model.model.layers."
SIZE_FIELDS = "hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size"


def llm_expected_keys(cfg: LLMConfig, ops=TorchOps) -> dict[str, tuple[int, ...]]:
    """Key -> shape the LLM built from `cfg` expects (built on the meta device: no memory)."""
    with torch.device("meta"):
        llm = LanceLLM(cfg, ops)
    return {key: tuple(t.shape) for key, t in llm.state_dict().items()}


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def check_llm_size(cfg: LLMConfig, paths: ReleasePaths, found: dict[str, tuple[int, ...]], ops=TorchOps) -> None:
    """The config's layer count and element count must match the weight file (header only, nothing built)."""
    check_layers(paths.llm_config, "num_hidden_layers", cfg.num_layers, paths.llm_weights, layer_count(found, LAYER_PREFIX))
    with torch.device("meta"):
        base = LanceLLM(replace(cfg, num_layers=0), ops)
        layer = MoTDecoderLayer(cfg, ops)
    expected = numel(base) + cfg.num_layers * numel(layer)
    in_file = file_elements(found, lambda key: not _ignored(key))
    if expected != in_file:
        shapes = {k: tuple(t.shape) for k, t in base.state_dict().items()}
        shapes.update({LAYER_PREFIX + "0." + k: tuple(t.shape) for k, t in layer.state_dict().items()})
        check_elements(paths.llm_config, SIZE_FIELDS, expected, paths.llm_weights, in_file, shapes, found)


def check_llm_files(paths: ReleasePaths, ops=TorchOps) -> tuple[LLMConfig, dict[str, tuple[int, ...]]]:
    """Config fields and their agreement with the weight header; reads no weights."""
    cfg = LLMConfig.from_file(paths.llm_config)
    found = safetensors_keys(paths.llm_weights)
    check_llm_size(cfg, paths, found, ops)
    return cfg, found


def load_llm(paths: ReleasePaths, dtype: torch.dtype, device: torch.device, ops=TorchOps,
             attention: Attention | None = None) -> LanceLLM:
    cfg, found = check_llm_files(paths, ops)
    with torch.device("meta"):
        llm = LanceLLM(cfg, ops, attention)
    expected = {key: tuple(t.shape) for key, t in llm.state_dict().items()}
    check_state_keys(paths.llm_weights, expected, found, ignore=_ignored)
    materialize(llm, stream_safetensors(paths.llm_weights, [(k, k) for k in expected], dtype, device))
    assert_no_meta(llm, str(paths.llm_weights))
    log.info("loaded Lance LLM from %s (%d tensors, %s, %s)", paths.llm_weights, len(expected), dtype, device)
    return llm.eval().requires_grad_(False)
