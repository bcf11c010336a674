"""Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`) for Lance's ViT tokens.

Its merged 2x2 outputs (`out_hidden_size` wide) go straight into the LLM as input embeddings; there is no connector.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from .checkpoint import assert_no_meta, check_state_keys, materialize, read_json, safetensors_keys, stream_safetensors
from .config import ConfigFields
from .module_handle import ModuleHandle
from .qwen_vision import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionConfig,
    merged_embeddings,
    vision_rotary,
)
from .size_check import check_elements, check_layers, file_elements, layer_count, numel

VIT_CONFIG_FILE = "config.json"
VIT_WEIGHTS_FILE = "vit.safetensors"
LANCE_VIT_PREFIX = "vit_model."  # the ViT copy inside Lance_3B(_Video)/model.safetensors
# Keys of the release config.json that are not vision-config fields (or must not be taken from the file).
_IGNORED_CONFIG_KEYS = ("model_type", "torch_dtype", "dtype", "architectures", "transformers_version")
# Plausible ranges of the fields the tower's shape depends on (checked when the file has them).
_INT_FIELDS = {
    "depth": (1, 256), "hidden_size": (1, 16384), "intermediate_size": (1, 65536), "num_heads": (1, 256),
    "out_hidden_size": (1, 65536), "patch_size": (1, 64), "spatial_merge_size": (1, 16),
    "spatial_patch_size": (1, 64), "temporal_patch_size": (1, 16), "in_chans": (1, 16), "in_channels": (1, 16),
    "window_size": (1, 1 << 16),
}
SIZE_FIELDS = "depth, hidden_size, intermediate_size, num_heads, out_hidden_size, patch_size, temporal_patch_size"


def _check_vit_fields(raw, path: Path) -> None:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    fields = ConfigFields(raw, str(path))
    values = {key: fields.int(key, *bounds) for key, bounds in _INT_FIELDS.items() if key in raw}
    if "tokens_per_second" in raw:
        fields.float("tokens_per_second", 0.0, 1000.0)
    if "hidden_size" in values and "num_heads" in values and values["hidden_size"] % values["num_heads"]:
        raise CheckpointError(f"{path}: hidden_size {values['hidden_size']} is not divisible by num_heads {values['num_heads']}")
    blocks = raw.get("fullatt_block_indexes", [])
    depth = values.get("depth")
    if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 and
                                               (depth is None or b < depth) for b in blocks):
        raise CheckpointError(f"{path}: field 'fullatt_block_indexes' is {blocks!r}; expected a list of block "
                              f"indices below depth {depth}")


def load_vit_config(path: str | Path) -> Qwen2_5_VLVisionConfig:
    """Vision config from the release's config.json, with attention forced to SDPA (the file may ask for
    flash_attention_2, which is optional and not needed for parity)."""
    raw = read_json(Path(path))
    _check_vit_fields(raw, Path(path))
    fields = {key: value for key, value in raw.items() if key not in _IGNORED_CONFIG_KEYS and not key.startswith("_")}
    try:
        config = Qwen2_5_VLVisionConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid Qwen2.5-VL vision config: {exc}") from exc
    config._attn_implementation = "sdpa"
    return config


def patchify(pixels: torch.Tensor, *, patch_size: int, temporal_patch_size: int,
             merge_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[3, T, H, W] -> (rows [N, 3*tp*p*p], grid (T/tp, H/p, W/p)), rows ordered so that each merge_size x
    merge_size neighbourhood is contiguous (the layout of the Hugging Face Qwen2-VL image processor)."""
    if pixels.dim() != 4 or pixels.shape[0] != 3:
        raise InputError(f"ViT pixels must be [3, T, H, W], got shape {tuple(pixels.shape)}")
    channels, frames, height, width = pixels.shape
    block = patch_size * merge_size
    if frames == 0 or frames % temporal_patch_size:
        raise InputError(f"ViT input needs a positive multiple of {temporal_patch_size} frames, got {frames}")
    if height == 0 or width == 0 or height % block or width % block:
        raise InputError(f"ViT input height/width must be positive multiples of {block}, got {height}x{width}")
    grid = (frames // temporal_patch_size, height // patch_size, width // patch_size)
    x = pixels.permute(1, 0, 2, 3).reshape(
        grid[0], temporal_patch_size, channels,
        grid[1] // merge_size, merge_size, patch_size,
        grid[2] // merge_size, merge_size, patch_size,
    )
    # (t, tp, c, hb, hm, p, wb, wm, p) -> (t, hb, wb, hm, wm, c, tp, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(grid[0] * grid[1] * grid[2], channels * temporal_patch_size * patch_size * patch_size)
    return rows, grid


class LanceViT(ModuleHandle):
    """Vision tower: CLIP-normalised pixels [3, T, H, W] -> merged embeddings [T/2 * H/28 * W/28, out_hidden]."""

    def __init__(self, module: Qwen2_5_VisionTransformerPretrainedModel):
        super().__init__(module)
        self.config: Qwen2_5_VLVisionConfig = module.config

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def temporal_patch_size(self) -> int:
        return int(self.config.temporal_patch_size)

    @property
    def merge_size(self) -> int:
        return int(self.config.spatial_merge_size)

    @property
    def out_hidden_size(self) -> int:
        return int(self.config.out_hidden_size)

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        return patchify(pixels, patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                        merge_size=self.merge_size)

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels [3, T, H, W] -> [t * h * w / merge^2 of its patch grid, out_hidden] in the module
        dtype, in (t, row, col) raster order of the merged grid."""
        rows, grid = self.patchify(pixels)
        rows = rows.to(device=self.device, dtype=self.dtype)
        grid_thw = torch.tensor([grid], dtype=torch.long, device=self.device)
        return merged_embeddings(self.module(rows, grid_thw))


def _resolve_sources(vit_source: str | Path | tuple[str | Path, str | Path]) -> tuple[Path, Path]:
    if isinstance(vit_source, tuple):
        config_path, weights_path = (Path(p).expanduser() for p in vit_source)
    else:
        folder = Path(vit_source).expanduser()
        config_path, weights_path = folder / VIT_CONFIG_FILE, folder / VIT_WEIGHTS_FILE
    for what, path in (("ViT config", config_path), ("ViT weights", weights_path)):
        if not path.is_file():
            raise CheckpointError(f"{what} not found: {path} (expected the release's Qwen2.5-VL-ViT/ folder)")
    return config_path, weights_path


def _check_vit_size(config: Qwen2_5_VLVisionConfig, config_path: Path, weights_path: Path,
                    found: dict[str, tuple[int, ...]]) -> None:
    """depth and element count against the weight header, from a one-block build on the meta device."""
    check_layers(config_path, "depth", config.depth, weights_path, layer_count(found, "blocks."))
    one_block = copy.deepcopy(config)
    one_block.depth, one_block.fullatt_block_indexes = 1, []
    with torch.device("meta"):
        tower = Qwen2_5_VisionTransformerPretrainedModel(one_block)
    block = numel(tower.blocks[0])
    expected = numel(tower) - block + config.depth * block
    in_file = file_elements(found, lambda key: True)
    if expected != in_file:
        shapes = {key: tuple(t.shape) for key, t in tower.state_dict().items()}
        check_elements(config_path, SIZE_FIELDS, expected, weights_path, in_file, shapes, found)


def check_vit_files(vit_source, lance_weights: str | Path | None = None):
    """Config fields and their agreement with the weight header; reads no weights.
    Returns (config, weights file, key prefix in it, key -> shape without the prefix)."""
    config_path, weights_path = _resolve_sources(vit_source)
    prefix = ""
    if lance_weights is not None:
        weights_path, prefix = Path(lance_weights).expanduser(), LANCE_VIT_PREFIX
        if not weights_path.is_file():
            raise CheckpointError(f"Lance weights not found: {weights_path}")
    config = load_vit_config(config_path)
    found = {key[len(prefix):]: shape for key, shape in safetensors_keys(weights_path).items() if key.startswith(prefix)}
    _check_vit_size(config, config_path, weights_path, found)
    return config, weights_path, prefix, found


def load_vit(vit_source: str | Path | tuple[str | Path, str | Path], dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", *, lance_weights: str | Path | None = None,
             checked: tuple | None = None) -> LanceViT:
    """Build the vision tower from `Qwen2.5-VL-ViT/config.json` and stream its weights into dtype/device.

    vit_source: the Qwen2.5-VL-ViT folder, or a (config.json, weights.safetensors) pair.
    lance_weights: optionally a Lance `model.safetensors`; the ViT tensors are then its `vit_model.*` entries
        instead of `vit.safetensors` (by the reference's load order these would override vit.safetensors; a
        third party reports vit.safetensors reproduces upstream outputs). Default: vit.safetensors. In the tiny
        golden checkpoint both sets are bit-identical, so either reproduces `vit/embeds`.
    checked: check_vit_files' result when the caller already ran it.
    """
    config, weights_path, prefix, found = checked or check_vit_files(vit_source, lance_weights)
    with torch.device("meta"):
        module = Qwen2_5_VisionTransformerPretrainedModel(config)
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    check_state_keys(weights_path, expected, found)
    device = torch.device(device)
    materialize(module, stream_safetensors(weights_path, [(prefix + key, key) for key in expected], dtype, device))
    # The rotary table is a non-persistent buffer (not in the file): rebuild it for real, in float32.
    module.rotary_pos_emb = vision_rotary(config).to(device)
    assert_no_meta(module, str(weights_path))
    return LanceViT(module.eval().requires_grad_(False))
