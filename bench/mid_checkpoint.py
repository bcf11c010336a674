"""A random "mid" Lance release on disk, in the exact release layout, written once (seeded) and reused.

Mid = a width where CPU timings mean something but a run takes seconds: LLM hidden 1024, 8 layers, 8 heads /
2 KV heads, head_dim 128, MLP 5504, mrope [16, 24, 24], vocab 16384 (both experts); the ViT at release width
(1280, 16 heads, MLP 3420) with depth 4; the Wan2.2 VAE at release size (dim 160, decoder dim 256, z 48). The
tokenizer and the special-token ids come from the tiny golden checkpoint (its ids fit the mid vocabulary).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import GOLDEN
from lance_model.checkpoint import load_torch_state_dict
from lance_model.config import LLMConfig
from lance_model.llm import LanceLLM
from lance_model.vae import _architecture_from_weights, _build_module, convert_wan_vae_keys

MID_LLM = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
               intermediate_size=5504, vocab_size=16384, torch_dtype="float32",
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
MID_VIT = dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1024,
               fullatt_block_indexes=[1, 3], window_size=112)
MID_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48)
VERSION = "1"   # bump when the layout above changes: a new folder is written
DEFAULT_ROOT = Path(os.environ.get("LANCE_BENCH_CACHE") or Path.home() / ".cache" / "lance-bench") / f"mid-v{VERSION}"


def _randn(shape, generator, scale=0.02) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


def _random_state(shapes: dict[str, tuple], generator) -> dict[str, torch.Tensor]:
    """Random weights; norm scales 1 and biases 0 so activations stay in a realistic range."""
    state = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith("weight"):
            state[key] = torch.ones(shape)
        elif key.endswith("bias"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = _randn(shape, generator)
    return state


def _write_llm(target: Path, generator) -> None:
    tiny = GOLDEN / "checkpoint" / "Lance_3B"
    target.mkdir(parents=True)
    for name in os.listdir(tiny):
        if name != "model.safetensors" and name != "llm_config.json":
            shutil.copy(tiny / name, target / name)
    raw = json.loads((tiny / "llm_config.json").read_text())
    raw.update(MID_LLM)
    (target / "llm_config.json").write_text(json.dumps(raw, indent=2))
    with torch.device("meta"):
        llm = LanceLLM(LLMConfig.from_dict(raw))
    shapes = {key: tuple(t.shape) for key, t in llm.state_dict().items()}
    save_file(_random_state(shapes, generator), str(target / "model.safetensors"))


def _write_vit(target: Path, generator) -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from lance_model.vit import load_vit_config
    target.mkdir(parents=True)
    raw = json.loads((GOLDEN / "checkpoint" / "Qwen2.5-VL-ViT" / "config.json").read_text())
    raw.update(MID_VIT)
    (target / "config.json").write_text(json.dumps(raw, indent=2))
    with torch.device("meta"):
        module = Qwen2_5_VisionTransformerPretrainedModel(load_vit_config(target / "config.json"))
    shapes = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    save_file(_random_state(shapes, generator), str(target / "vit.safetensors"))


def _write_vae(target: Path, generator) -> None:
    """Wan-native keys as the tiny release has them, with the shapes of the release-size architecture."""
    tiny = load_torch_state_dict(GOLDEN / "checkpoint" / "Wan2.2_VAE.pth")
    arch = dict(_architecture_from_weights(convert_wan_vae_keys(dict(tiny)), target), **MID_VAE)
    shapes = {key: tuple(t.shape) for key, t in _build_module(arch).state_dict().items()}
    native = {key: _converted_shape(key, shapes) for key in tiny}
    torch.save(_random_state(native, generator), target)


def _converted_shape(native_key: str, shapes: dict[str, tuple]) -> tuple:
    return shapes[next(iter(convert_wan_vae_keys({native_key: None})))]


def mid_release(root: Path = DEFAULT_ROOT) -> Path:
    """The mid release folder, written on first use (a few hundred MB, ~1 minute)."""
    if (root / "complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    generator = torch.Generator().manual_seed(1234)
    _write_llm(root / "Lance_3B", generator)
    _write_vit(root / "Qwen2.5-VL-ViT", generator)
    _write_vae(root / "Wan2.2_VAE.pth", generator)
    (root / "complete").write_text(VERSION)
    return root
