"""The one place that knows where transformers keeps the Qwen2.5-VL vision tower, from 4.50.3 (ComfyUI core's floor)
to 5.x: the tower and its config live in the same modules in both (4.x does not export them at the top level), but
the rotary table is `Qwen2_5_VisionRotaryEmbedding(head_dim // 2)` in 4.x and `Qwen2_5_VLVisionRotaryEmbedding(config)`
in 5.x, and the tower returns the merged embeddings itself in 4.x, as `.pooler_output` in 5.x.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as _modeling
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

__all__ = ["Qwen2_5_VLVisionConfig", "Qwen2_5_VisionTransformerPretrainedModel", "merged_embeddings", "vision_rotary"]


def vision_rotary(config: Qwen2_5_VLVisionConfig) -> nn.Module:
    """A new rotary-frequency module for a tower of this config (its table is a computed, unsaved buffer)."""
    if hasattr(_modeling, "Qwen2_5_VLVisionRotaryEmbedding"):   # transformers 5.x
        return _modeling.Qwen2_5_VLVisionRotaryEmbedding(config)
    head_dim = config.hidden_size // config.num_heads           # transformers 4.x: half the head dim, theta 10000
    return _modeling.Qwen2_5_VisionRotaryEmbedding(head_dim // 2)


def merged_embeddings(output) -> torch.Tensor:
    """The tower's merged (spatial_merge_size^2) embeddings from what its forward returned."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
