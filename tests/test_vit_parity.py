"""Qwen2.5-VL ViT (transformers) + patchify against the golden fixtures and the HF Qwen2-VL processors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLImageProcessor

from lance_model.io import media
from lance_model.errors import CheckpointError, InputError
from lance_model.tasks.templates import vit_visual
from lance_model.nn.vit import LanceViT, load_vit, load_vit_config, patchify
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def vit_dir(golden):
    return golden.checkpoint / "Qwen2.5-VL-ViT"


@pytest.fixture(scope="module")
def vit(vit_dir) -> LanceViT:
    return load_vit(vit_dir, torch.float32, "cpu")


def _fixture_pixels(golden, task: str) -> torch.Tensor:
    _, vit_side = media.preset_sides(golden.hyper(task)["resolution"])
    return media.vit_pixels(golden.input_media(task), vit_side)


@pytest.mark.parametrize("task", ["x2t_image", "x2t_video", "image_edit", "video_edit"])
def test_vit_embeds_parity(golden, vit, task):
    pixels = _fixture_pixels(golden, task)
    embeds = vit.embed(pixels)
    _, grid = vit.patchify(pixels)
    merged = vit.merge_size ** 2
    assert embeds.shape[0] == vit_visual(grid, vit.merge_size).tokens == golden.tensors(task)["packed/vit_video_grid_thw"].prod() // merged
    assert_close(embeds, golden.tensors(task)["vit/embeds"], golden.tolerance("vit/embeds"), f"{task} vit/embeds")


def test_vit_weights_from_lance_checkpoint_parity(golden, vit_dir):
    # Spec 2.3 quirk: model.safetensors may carry its own vit_model.* copy. In the tiny set both copies are
    # identical, so both sources must reproduce the fixture.
    from_lance = load_vit(vit_dir, torch.float32, "cpu",
                          lance_weights=golden.checkpoint / "Lance_3B" / "model.safetensors")
    embeds = from_lance.embed(_fixture_pixels(golden, "x2t_image"))
    assert_close(embeds, golden.tensors("x2t_image")["vit/embeds"], golden.tolerance("vit/embeds"),
                 "x2t_image vit/embeds (vit_model.* weights)")


def test_packed_vit_tokens_parity(golden, vit):
    rows, grid = vit.patchify(_fixture_pixels(golden, "x2t_image"))
    expected = golden.tensors("x2t_image")["packed/packed_vit_tokens.0"]
    assert list(grid) == golden.tensors("x2t_image")["packed/vit_video_grid_thw"][0].tolist()
    assert_close(rows, expected, 1e-5, "x2t_image packed/packed_vit_tokens.0")


def test_patchify_matches_hf_image_processor():
    torch.manual_seed(0)
    unit = torch.rand(3, 56, 84)
    processor = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=True,
                                      image_mean=list(media.CLIP_MEAN), image_std=list(media.CLIP_STD))
    reference = processor(images=[unit], return_tensors="pt")
    mean = torch.tensor(media.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(media.CLIP_STD).view(3, 1, 1)
    normalised = ((unit - mean) / std).unsqueeze(1).repeat(1, 2, 1, 1)  # an image is two equal frames
    rows, grid = patchify(normalised, patch_size=14, temporal_patch_size=2, merge_size=2)
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    assert_close(rows, reference["pixel_values"], 1e-6, "patchify vs Qwen2VLImageProcessor")


def test_patchify_matches_hf_video_processor():
    # distinct frames check the temporal layout, which the image processor cannot
    pytest.importorskip("torchvision", reason="transformers' Qwen2VLVideoProcessor needs torchvision (not a "
                        "dependency of this pack): the temporal patch layout is not compared with it here")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(1)
    frames = torch.rand(4, 3, 28, 56)
    processor = Qwen2VLVideoProcessor(do_resize=False, do_rescale=False, do_normalize=False, do_sample_frames=False)
    reference = processor(videos=[frames], return_tensors="pt")
    rows, grid = patchify(frames.permute(1, 0, 2, 3), patch_size=14, temporal_patch_size=2, merge_size=2)
    assert list(grid) == reference["video_grid_thw"][0].tolist() == [2, 2, 4]
    assert torch.equal(rows, reference["pixel_values_videos"])


@pytest.mark.parametrize("blocks", [(1, 1, 1), (2, 2, 3), (3, 4, 1)])
def test_row_count_is_grid_over_the_merge(vit, blocks):
    """(temporal patches, merged rows, merged columns) -> one row per patch, one embedding per merge block."""
    p, tp, m = vit.patch_size, vit.temporal_patch_size, vit.merge_size
    pixels = torch.randn(3, blocks[0] * tp, blocks[1] * p * m, blocks[2] * p * m)
    rows, grid = vit.patchify(pixels)
    assert rows.shape == (grid[0] * grid[1] * grid[2], 3 * tp * p * p)
    embeds = vit.embed(pixels)
    assert embeds.shape == (grid[0] * grid[1] * grid[2] // m ** 2, vit.out_hidden_size)
    assert vit_visual(grid, m).tokens == embeds.shape[0]


def test_config_forces_sdpa(vit_dir, tmp_path, vit):
    config = json.loads((vit_dir / "config.json").read_text())
    config["_attn_implementation"] = "flash_attention_2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_vit_config(tmp_path / "config.json")._attn_implementation == "sdpa"
    assert vit.module.config._attn_implementation == "sdpa"
    assert (vit.patch_size, vit.temporal_patch_size, vit.merge_size) == \
        (config["patch_size"], config["temporal_patch_size"], config["spatial_merge_size"])
    assert vit.module.rotary_pos_emb.inv_freq.dtype == torch.float32


def test_load_casts_to_dtype(vit_dir):
    bf16 = load_vit(vit_dir, torch.bfloat16, "cpu")
    assert bf16.dtype == torch.bfloat16
    assert bf16.embed(torch.zeros(3, 2, 28, 28)).dtype == torch.bfloat16


def test_bad_inputs(vit):
    with pytest.raises(InputError, match=r"\[3, T, H, W\]"):
        vit.embed(torch.zeros(2, 28, 28))
    with pytest.raises(InputError, match="multiple of 2 frames"):
        vit.embed(torch.zeros(3, 3, 28, 28))
    with pytest.raises(InputError, match="multiples of 28"):
        vit.embed(torch.zeros(3, 2, 28, 42))
    with pytest.raises(InputError):
        vit.embed(torch.zeros(3, 0, 28, 28))


def test_checkpoint_errors(vit_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vit(tmp_path)
    (tmp_path / "config.json").write_text((vit_dir / "config.json").read_text())
    weights = load_file(str(vit_dir / "vit.safetensors"))
    weights.pop("merger.mlp.2.bias")
    weights["blocks.0.norm1.weight"] = torch.zeros(7)
    save_file(weights, str(tmp_path / "vit.safetensors"))
    with pytest.raises(CheckpointError, match=r"merger\.mlp\.2\.bias") as error:
        load_vit(tmp_path)
    assert "blocks.0.norm1.weight" in str(error.value) and "(7,)" in str(error.value)
    (tmp_path / "vit.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="vit.safetensors"):
        load_vit(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_vit(vit_dir, lance_weights=tmp_path / "model.safetensors")
