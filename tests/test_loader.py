"""Loading: the release layout, the real-size configuration (meta device), and bad inputs."""
import json
import shutil

import pytest
import torch

from lance_model import CheckpointError, InputError, load_lance
from lance_model.nn.checkpoint import resolve_release
from lance_model.nn.config import LLMConfig
from lance_model.runtime.devices import resolve_device, resolve_dtype
from lance_model.runtime.loader import IGNORED_KEYS, llm_expected_keys

REAL = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
            intermediate_size=11008, vocab_size=151936)


def real_size_config(golden) -> LLMConfig:
    """The tiny llm_config.json with the release's architecture numbers (Qwen2.5-VL-3B)."""
    raw = json.loads((golden.checkpoint / "Lance_3B" / "llm_config.json").read_text())
    raw.update(REAL, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    return LLMConfig.from_dict(raw)


def test_real_size_parameter_count_and_keys(golden):
    cfg = real_size_config(golden)
    keys = llm_expected_keys(cfg)
    h, i, kv, v = 2048, 11008, 2 * 128, 151936
    per_expert_layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 2 * 128 + 2 * h + 3 * h * i
    expected_params = (36 * 2 * per_expert_layer + 2 * v * h + 2 * h
                       + (256 * h + h) + (h * h + h) + (48 * h + h) + (h * 48 + 48))
    assert per_expert_layer == 77_077_248  # ~77.1 M per expert per layer (spec 2.4)
    assert sum(torch.Size(s).numel() for s in keys.values()) == expected_params
    assert len(keys) + len(IGNORED_KEYS) == 1012 + 9  # 28 per layer + 4 shared, + 9 non-LLM tensors
    assert keys["language_model.model.layers.35.self_attn.k_proj_moe_gen.weight"] == (256, 2048)
    assert keys["language_model.model.layers.0.mlp_moe_gen.down_proj.weight"] == (2048, 11008)
    assert keys["language_model.lm_head.weight"] == (151936, 2048)
    assert keys["vae2llm.weight"] == (2048, 48) and keys["llm2vae.weight"] == (48, 2048)


def test_tiny_checkpoint_keys_match_the_model_built_from_its_config(golden):
    from safetensors import safe_open

    paths = resolve_release(golden.checkpoint)
    cfg = LLMConfig.from_file(paths.llm_config)
    with safe_open(str(paths.llm_weights), "pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("vit_model.")}
    assert found == llm_expected_keys(cfg)


def test_config_comes_from_the_file(pipe, golden):
    raw = json.loads((golden.checkpoint / "Lance_3B" / "llm_config.json").read_text())
    cfg = pipe.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["vocab_size"])
    assert list(cfg.mrope_section) == raw["rope_scaling"]["mrope_section"]
    special = golden.manifest["special_token_ids"]
    s = pipe.tokenizer.special
    assert (s.im_start, s.im_end, s.vision_start, s.vision_end, s.placeholder) == (
        special["<|im_start|>"], special["<|im_end|>"], special["<|vision_start|>"], special["<|vision_end|>"], special["<|video_pad|>"])


def copy_release(golden, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(golden.checkpoint, root)
    for path in root.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return root


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lance(tmp_path / "nope", device="cpu")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_lance(f, device="cpu")


def test_folder_of_another_model_lists_what_is_expected(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="Lance_3B.*Qwen2.5-VL-ViT.*Wan2.2_VAE.pth"):
        load_lance(tmp_path, device="cpu")


def test_incomplete_release_names_missing_files(golden, tmp_path):
    root = copy_release(golden, tmp_path)
    (root / "Wan2.2_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match="missing VAE weights"):
        load_lance(root, device="cpu")


def test_truncated_safetensors(golden, tmp_path):
    root = copy_release(golden, tmp_path)
    weights = root / "Lance_3B" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lance(root, device="cpu")


def test_wrong_shape_names_key_and_shapes(golden, tmp_path):
    root = copy_release(golden, tmp_path)
    cfg_path = root / "Lance_3B" / "llm_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["intermediate_size"] *= 2
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"mlp.*expected shape \(\d+, \d+\), found"):
        load_lance(root, device="cpu")


def test_release_config_without_vision_facts_falls_back_to_qwen_values(golden, caplog):
    raw = json.loads((golden.checkpoint / "Lance_3B" / "llm_config.json").read_text())
    raw.update(REAL)
    for key in ("rope_scaling", "vision_config", "video_token_id", "vision_start_token_id"):
        raw.pop(key)
    cfg = LLMConfig.from_dict(raw)
    assert cfg.mrope_section == (16, 24, 24) and cfg.spatial_merge_size == 2 and cfg.tokens_per_second == 2
    assert "missing, using the Qwen2.5-VL value" in caplog.text


def test_missing_config_field(golden, tmp_path):
    root = copy_release(golden, tmp_path)
    cfg_path = root / "Lance_3B" / "llm_config.json"
    raw = json.loads(cfg_path.read_text())
    del raw["rope_scaling"]
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        load_lance(root, device="cpu")


def test_corrupt_vae_pickle(golden, tmp_path):
    root = copy_release(golden, tmp_path)
    (root / "Wan2.2_VAE.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="Wan2.2_VAE.pth"):
        load_lance(root, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda")


def test_bad_dtype_and_options(golden):
    with pytest.raises(InputError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(InputError, match="attention backend"):
        load_lance(golden.checkpoint, device="cpu", attention="xformers")
    with pytest.raises(InputError, match="memory"):
        load_lance(golden.checkpoint, device="cpu", memory="swap")


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_bf16_load_runs(golden):
    """The user's precision: everything loads in bf16 and a t2i step produces finite latents."""
    pipe = load_lance(golden.checkpoint, dtype="bf16", device="cpu")
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16 and pipe.vit.dtype == torch.bfloat16
    out = pipe.text_to_image("a red cat", width=64, height=64, steps=2)
    assert torch.isfinite(out.latents).all() and out.frames.shape == (1, 1, 64, 64, 3)


def test_offload_mode_matches_resident(golden, pipe):
    offloaded = load_lance(golden.checkpoint, dtype="fp32", device="cpu", memory="offload")
    a = offloaded.text_to_image("a red cat", width=64, height=64, steps=2, decode=False).latents
    b = pipe.text_to_image("a red cat", width=64, height=64, steps=2, decode=False).latents
    assert torch.equal(a, b)
