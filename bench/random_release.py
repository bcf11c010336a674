"""Random Lance releases on disk, in the exact release layout, written once (seeded) and reused.

* mid: a width where CPU timings mean something but a run takes seconds: LLM hidden 1024, 8 layers, 8 heads /
  2 KV heads, head_dim 128, MLP 5504, mrope [16, 24, 24], vocab 16384 (both experts); the ViT at release width
  (1280, 16 heads, MLP 3420) with depth 4; fp32 files, 4.4 GB.
* real: the release configuration (hidden 2048, 36 layers, 16/2 heads, MLP 11008, vocab 151936, both experts;
  the ViT at depth 32): bf16 safetensors like the release, 16.5 GB.
Both use the Wan2.2 VAE at release size (dim 160, decoder dim 256, z 48, fp32 .pth). The tokenizer and the
special-token ids come from the tiny golden checkpoint (its ids fit both vocabularies). Tensors are generated
and written one at a time, so writing the real release needs no more memory than its largest tensor.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from bench.common import GOLDEN
from lance_model.nn.checkpoint import load_torch_state_dict
from lance_model.nn.config import LLMConfig
from lance_model.nn.llm import LanceLLM
from lance_model.nn.vae import _architecture_from_weights, _build_module, convert_wan_vae_keys

MID_LLM = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
               intermediate_size=5504, vocab_size=16384, torch_dtype="float32",
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
MID_VIT = dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1024,
               fullatt_block_indexes=[1, 3], window_size=112)
REAL_LLM = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                intermediate_size=11008, vocab_size=151936, torch_dtype="bfloat16",
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
REAL_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                fullatt_block_indexes=[7, 15, 23, 31], window_size=112)
RELEASE_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48)
SIZES = {"mid": (MID_LLM, MID_VIT, torch.float32), "real": (REAL_LLM, REAL_VIT, torch.bfloat16)}
VERSION = "1"   # bump when the layouts above change: a new folder is written
CACHE = Path(os.environ.get("LANCE_BENCH_CACHE") or Path.home() / ".cache" / "lance-bench")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _randn(shape, generator, scale=0.02) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


def _random_tensor(key: str, shape: tuple, generator) -> torch.Tensor:
    """Random weights; norm scales 1 and biases 0 so activations stay in a realistic range."""
    if "norm" in key and key.endswith("weight"):
        return torch.ones(shape)
    if key.endswith("bias"):
        return torch.zeros(shape)
    return _randn(shape, generator)


def _random_state(shapes: dict[str, tuple], generator) -> dict[str, torch.Tensor]:
    return {key: _random_tensor(key, shape, generator) for key, shape in shapes.items()}


def write_random_safetensors(path: Path, shapes: dict[str, tuple], dtype: torch.dtype, generator) -> None:
    """A safetensors file of random tensors written one at a time (the header first, from the shapes)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, shape in shapes.items():
            out.write(_random_tensor(key, shape, generator).to(dtype).contiguous().view(-1).view(torch.uint8).numpy())


def _write_llm(target: Path, sizes: dict, dtype: torch.dtype, generator) -> None:
    tiny = GOLDEN / "checkpoint" / "Lance_3B"
    target.mkdir(parents=True)
    for name in os.listdir(tiny):
        if name != "model.safetensors" and name != "llm_config.json":
            shutil.copy(tiny / name, target / name)
    raw = json.loads((tiny / "llm_config.json").read_text())
    raw.update(sizes)
    (target / "llm_config.json").write_text(json.dumps(raw, indent=2))
    with torch.device("meta"):
        llm = LanceLLM(LLMConfig.from_dict(raw))
    shapes = {key: tuple(t.shape) for key, t in llm.state_dict().items()}
    write_random_safetensors(target / "model.safetensors", shapes, dtype, generator)


def _write_vit(target: Path, sizes: dict, dtype: torch.dtype, generator) -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from lance_model.nn.vit import load_vit_config
    target.mkdir(parents=True)
    raw = json.loads((GOLDEN / "checkpoint" / "Qwen2.5-VL-ViT" / "config.json").read_text())
    raw.update(sizes)
    (target / "config.json").write_text(json.dumps(raw, indent=2))
    with torch.device("meta"):
        module = Qwen2_5_VisionTransformerPretrainedModel(load_vit_config(target / "config.json"))
    shapes = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    write_random_safetensors(target / "vit.safetensors", shapes, dtype, generator)


def _write_vae(target: Path, generator) -> None:
    """Wan-native keys as the tiny release has them, with the shapes of the release-size architecture."""
    tiny = load_torch_state_dict(GOLDEN / "checkpoint" / "Wan2.2_VAE.pth")
    arch = dict(_architecture_from_weights(convert_wan_vae_keys(dict(tiny)), target), **RELEASE_VAE)
    shapes = {key: tuple(t.shape) for key, t in _build_module(arch).state_dict().items()}
    native = {key: _converted_shape(key, shapes) for key in tiny}
    torch.save(_random_state(native, generator), target)


def _converted_shape(native_key: str, shapes: dict[str, tuple]) -> tuple:
    return shapes[next(iter(convert_wan_vae_keys({native_key: None})))]


def random_release(size: str) -> Path:
    """The `size` ("mid" or "real") release folder under CACHE, written on first use (mid: ~1.5 minutes,
    real: several minutes and 16.5 GB of disk)."""
    llm_sizes, vit_sizes, dtype = SIZES[size]
    root = CACHE / f"{size}-v{VERSION}"
    if (root / "complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    generator = torch.Generator().manual_seed(1234)
    _write_llm(root / "Lance_3B", llm_sizes, dtype, generator)
    _write_vit(root / "Qwen2.5-VL-ViT", vit_sizes, dtype, generator)
    _write_vae(root / "Wan2.2_VAE.pth", generator)
    (root / "complete").write_text(VERSION)
    return root


def mid_release() -> Path:
    return random_release("mid")
