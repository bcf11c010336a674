"""Build modules on the meta device from the release configs and stream the weights into them."""
from __future__ import annotations

import logging

import torch

from .attention import Attention
from .checkpoint import (ReleasePaths, assert_no_meta, check_state_keys, materialize, safetensors_keys,
                         stream_safetensors)
from .config import LLMConfig
from .llm import LanceLLM
from .ops import TorchOps

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("vit_model.",)      # the ViT is loaded from Qwen2.5-VL-ViT/ (see vit.py)
IGNORED_KEYS = ("latent_pos_embed.pos_embed",)  # fixed sin-cos table, recomputed (positions.py)


def llm_expected_keys(cfg: LLMConfig, ops=TorchOps) -> dict[str, tuple[int, ...]]:
    """Key -> shape the LLM built from `cfg` expects (built on the meta device: no memory)."""
    with torch.device("meta"):
        llm = LanceLLM(cfg, ops)
    return {key: tuple(t.shape) for key, t in llm.state_dict().items()}


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def load_llm(paths: ReleasePaths, dtype: torch.dtype, device: torch.device, ops=TorchOps,
             attention: Attention | None = None) -> LanceLLM:
    cfg = LLMConfig.from_file(paths.llm_config)
    with torch.device("meta"):
        llm = LanceLLM(cfg, ops, attention)
    expected = {key: tuple(t.shape) for key, t in llm.state_dict().items()}
    check_state_keys(paths.llm_weights, expected, safetensors_keys(paths.llm_weights), ignore=_ignored)
    materialize(llm, stream_safetensors(paths.llm_weights, [(k, k) for k in expected], dtype, device))
    assert_no_meta(llm, str(paths.llm_weights))
    log.info("loaded Lance LLM from %s (%d tensors, %s, %s)", paths.llm_weights, len(expected), dtype, device)
    return llm.eval().requires_grad_(False)
