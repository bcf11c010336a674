"""Library robustness (issue 9): config sanity before building, no file-backed weights (SIGBUS), NaN/Inf and type
checks naming the argument, size bounds and up-front memory estimates, interrupts inside long loops, one call at a
time per pipeline, and out-of-memory errors that leave the model usable. Case ids read as "what: input"."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lance_model import CheckpointError, InputError, SamplingOptions, load_lance
from lance_model.nn.config import LLMConfig
from lance_model.errors import Cancelled, OutOfMemory
from lance_model.nn.llm import LanceLLM, MoTDecoderLayer
from lance_model.runtime.memory import (
    GIB,
    Estimate,
    forward_activation_bytes,
    kv_cache_bytes,
    vae_decode_bytes,
)
from lance_model.nn.ops import TorchOps
from lance_model.nn.size_check import numel

NAN, INF = math.nan, math.inf
SMALL = dict(width=64, height=64, steps=2)
REPO = Path(__file__).resolve().parents[1]
IS_LINUX = sys.platform.startswith("linux")


def copy_release(golden, root: Path) -> Path:
    shutil.copytree(golden.checkpoint, root)
    for path in root.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return root


def edit_json(path: Path, changes: dict) -> None:
    raw = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        target = raw
        for parent in parents:
            target = target[parent]
        target[key] = value
    path.write_text(json.dumps(raw))


# ------------------------------------------------------------------------------------------- 1. config sanity
LLM_CONFIG_CASES = [
    ("num_hidden_layers", 100000, r"'num_hidden_layers' is 100000 .*1\.\.256"),
    ("num_hidden_layers", "two", r"'num_hidden_layers' is 'two' \(str\); expected an integer"),
    ("num_hidden_layers", 3, r"'num_hidden_layers' is 3 but .*model.safetensors holds 2 layers"),
    ("num_hidden_layers", 2.0, r"'num_hidden_layers' is 2.0 \(float\); expected an integer"),
    ("hidden_size", True, r"'hidden_size' is True \(bool\)"),
    ("hidden_size", None, r"'hidden_size' is None"),
    ("intermediate_size", 256, r"intermediate_size.* describe has [\d,]+ weight elements but .*model.safetensors holds"),
    ("vocab_size", 1024, r"vocab_size.* describe has [\d,]+ weight elements .*embed_tokens"),
    ("vocab_size", -5, r"'vocab_size' is -5"),
    ("num_key_value_heads", 3, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("num_attention_heads", 0, r"'num_attention_heads' is 0"),
    ("rms_norm_eps", "tiny", r"'rms_norm_eps' is 'tiny'"),
    ("rope_theta", -1, r"'rope_theta' is -1"),
    ("rope_theta", NAN, r"'rope_theta' is nan"),
    ("rope_scaling.mrope_section", [2, 3, "3"], r"mrope_section"),
    ("vision_config.spatial_merge_size", 0, r"'vision_config.spatial_merge_size' is 0"),
    ("video_token_id", 99999, r"'video_token_id' is 99999 .*0\.\.767"),
    ("max_position_embeddings", 0, r"'max_position_embeddings' is 0"),
]


@pytest.mark.parametrize("field, value, message", LLM_CONFIG_CASES,
                         ids=[f"llm_config: {f}={v!r}" for f, v, _ in LLM_CONFIG_CASES])
def test_llm_config_field_is_checked_before_building(golden, tmp_path, monkeypatch, field, value, message):
    root = copy_release(golden, tmp_path / "release")
    edit_json(root / "Lance_3B" / "llm_config.json", {field: value})
    built = []
    import lance_model.runtime.loader as loader
    monkeypatch.setattr(loader, "LanceLLM", lambda cfg, *a, **k: built.append(cfg.num_layers) or LanceLLM(cfg, *a, **k))
    with pytest.raises(CheckpointError, match=message) as error:
        load_lance(root, dtype="fp32", device="cpu")
    assert "llm_config.json" in str(error.value)
    assert all(layers == 0 for layers in built), f"a model with {built} layers was built before the error"


def test_llm_config_not_an_object(golden, tmp_path):
    root = copy_release(golden, tmp_path / "release")
    (root / "Lance_3B" / "llm_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"llm_config.json: expected a JSON object, got list"):
        load_lance(root, dtype="fp32", device="cpu")


VIT_CONFIG_CASES = [
    ("depth", 100000, r"'depth' is 100000 .*1\.\.256"),
    ("depth", 8, r"'depth' is 8 but .*vit.safetensors holds 4 layers"),
    ("hidden_size", "two", r"'hidden_size' is 'two' \(str\)"),
    ("intermediate_size", 128, r"describe has [\d,]+ weight elements but .*vit.safetensors holds"),
    ("patch_size", 0, r"'patch_size' is 0"),
    ("num_heads", 3, r"hidden_size 32 is not divisible by num_heads 3"),
    ("fullatt_block_indexes", [7], r"'fullatt_block_indexes' is \[7\]"),
    ("tokens_per_second", INF, r"'tokens_per_second' is inf"),
]


@pytest.mark.parametrize("field, value, message", VIT_CONFIG_CASES,
                         ids=[f"vit config.json: {f}={v!r}" for f, v, _ in VIT_CONFIG_CASES])
def test_vit_config_field_is_checked(golden, tmp_path, field, value, message):
    root = copy_release(golden, tmp_path / "release")
    edit_json(root / "Qwen2.5-VL-ViT" / "config.json", {field: value})
    with pytest.raises(CheckpointError, match=message) as error:
        load_lance(root, dtype="fp32", device="cpu")
    assert "config.json" in str(error.value)


def test_size_check_counts_match_a_full_build(golden):
    """The layer-free + one-layer count equals the full model's, at the tiny and at the release size."""
    tiny = LLMConfig.from_file(golden.checkpoint / "Lance_3B" / "llm_config.json")
    for cfg in (tiny, replace(tiny, num_layers=5)):
        with torch.device("meta"):
            full = numel(LanceLLM(cfg))
            parts = numel(LanceLLM(replace(cfg, num_layers=0))) + cfg.num_layers * numel(MoTDecoderLayer(cfg, TorchOps))
        assert parts == full


# ------------------------------------------------------------------------------------------- 2. SIGBUS
WEIGHT_FILES = ("Lance_3B/model.safetensors", "Qwen2.5-VL-ViT/vit.safetensors", "Wan2.2_VAE.pth")
SIGBUS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import lance_model.nn.checkpoint as checkpoint
    from lance_model import load_lance
    root, mapped = Path(sys.argv[1]), sys.argv[2] == "mapped"
    if mapped:  # control run: the old behaviour (weights left as mappings of the files)
        checkpoint.private_copy = lambda source, converted: converted
        import lance_model.nn.vae as vae
        vae.private_copy = checkpoint.private_copy
    pipe = load_lance(root, dtype="fp32", device="cpu")
    before = pipe.text_to_image("a red cat", width=64, height=64, steps=2, seed=1).frames
    for name in %r:
        with open(root / name, "r+b") as handle:   # rewritten in place (same inode), as `cp` over it does
            handle.truncate(0)
    after = pipe.text_to_image("a red cat", width=64, height=64, steps=2, seed=1).frames
    answer = pipe.understand(torch.rand(1, 64, 64, 3), "What is it?", max_new_tokens=2, resolution="image_256res")
    print(json.dumps({"changed": pipe.changed_files(), "same": bool(torch.equal(before, after))}))
""" % (WEIGHT_FILES,))


def _run_truncation(root: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", SIGBUS_SCRIPT, str(root), mode], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.skipif(not IS_LINUX, reason="SIGBUS on truncated mappings is Linux behaviour")
def test_truncating_weight_files_after_load_does_not_kill_the_process(golden, tmp_path):
    root = copy_release(golden, tmp_path / "release")
    result = _run_truncation(root, "private")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same"], "the run after the files changed must use the loaded weights unchanged"
    assert sorted(Path(p).relative_to(root).as_posix() for p in report["changed"]) == sorted(WEIGHT_FILES)


@pytest.mark.skipif(not IS_LINUX, reason="SIGBUS on truncated mappings is Linux behaviour")
def test_control_mapped_weights_do_die_with_sigbus(golden, tmp_path):
    """Shows the hazard the previous test guards against is real: with the private copies disabled, the same
    script is killed by SIGBUS."""
    root = copy_release(golden, tmp_path / "release")
    result = _run_truncation(root, "mapped")
    assert result.returncode == -signal.SIGBUS, (result.returncode, result.stderr[-2000:])


@pytest.mark.skipif(not IS_LINUX, reason="reads /proc/self/maps")
def test_loaded_weights_map_no_checkpoint_file(golden, tmp_path):
    root = copy_release(golden, tmp_path / "release")
    pipe = load_lance(root, dtype="fp32", device="cpu")
    import gc
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(root) in line]
    assert mapped == [] and pipe.changed_files() == []


def test_changed_files_reports_rewritten_and_removed_files(golden, tmp_path):
    root = copy_release(golden, tmp_path / "release")
    pipe = load_lance(root, dtype="fp32", device="cpu")
    snapshot = pipe.paths.snapshot()
    assert set(snapshot) >= {str(pipe.paths.llm_weights), str(pipe.paths.vae_weights), str(pipe.paths.vit_weights)}
    config = root / "Lance_3B" / "llm_config.json"
    config.write_text(config.read_text() + "\n")
    (root / "Wan2.2_VAE.pth").unlink()
    assert sorted(pipe.changed_files()) == sorted([str(config), str(root / "Wan2.2_VAE.pth")])


# ------------------------------------------------------------------------------------------- 3. types and NaN/Inf
T2I_CASES = [
    ("steps", "10", r"steps must be an integer in 1\.\.1000, got '10' \(str\)"),
    ("steps", 0, r"steps must be an integer in 1\.\.1000, got 0"),
    ("steps", 10**6, r"steps must be an integer"),
    ("steps", 2.0, r"steps must be an integer"),
    ("width", None, r"width must be an integer >= 16, got None"),
    ("height", 64.5, r"height must be an integer >= 16"),
    ("width", 4096, r"width 4096 exceeds the model's maximum of 1024"),
    ("cfg_scale", NAN, r"cfg_scale must be a finite number, got nan"),
    ("cfg_scale", INF, r"cfg_scale must be a finite number, got inf"),
    ("cfg_scale", "4", r"cfg_scale must be a number, got '4'"),
    ("cfg_scale", 0.5, r"cfg_scale must be in \[1.0"),
    ("cfg_renorm_min", NAN, r"cfg_renorm_min must be a finite number, got nan"),
    ("cfg_renorm_min", 2.0, r"cfg_renorm_min must be in \[0.0, 1.0\]"),
    ("shift", NAN, r"shift must be a finite number"),
    ("shift", 0.0, r"shift must be > 0.0"),
    ("cfg_interval", 0.5, r"cfg_interval must be a pair \(start, end\)"),
    ("cfg_interval", (NAN, 1.0), r"cfg_interval start must be a finite number"),
    ("cfg_interval", (0.4, INF), r"cfg_interval end must be a finite number"),
    ("cfg_interval", (0.9, 0.1), r"cfg_interval: the start 0.9 must not be greater than the end 0.1"),
    ("cfg_renorm", "l2", r"cfg_renorm must be one of \['global', 'channel', 'none'\]"),
    ("seed", -1, r"seed must be an integer in 0\.\.18446744073709551615, got -1"),
    ("seed", 1.5, r"seed must be an integer .*got 1.5 \(float\)"),
    ("seed", 2**64, r"seed must be an integer in 0\.\.18446744073709551615"),
    ("seed", "42", r"seed must be an integer .*'42' \(str\)"),
    ("batch_size", True, r"batch_size must be an integer in 1\.\.64, got True \(bool\)"),
    ("batch_size", 0, r"batch_size must be an integer in 1\.\.64"),
    ("batch_size", 65, r"batch_size must be an integer in 1\.\.64"),
    ("batched_cfg", "auto", r"batched_cfg must be True or False"),
    ("decode", "yes", r"decode must be True or False"),
    ("include_history", 1, r"include_history must be True or False"),
    ("euler_state", "fp16", r"euler_state must be one of \['fp32', 'bf16'\]"),
    ("uncond_positions", None, r"uncond_positions must be one of"),
    ("on_step", 5, r"on_step must be a function or None, got int"),
    ("cancel", True, r"cancel must be a function or None, got bool"),
    ("context", "abc", r"context must be a LanceContext"),
    ("sampler", "euler", r"unknown generation option\(s\) \['sampler'\]"),
]


@pytest.mark.parametrize("name, value, message", T2I_CASES, ids=[f"t2i: {n}={v!r}" for n, v, _ in T2I_CASES])
def test_t2i_bad_argument(pipe, name, value, message):
    kwargs = dict(SMALL, **{name: value})
    with pytest.raises(InputError, match=message):
        pipe.text_to_image("a red cat", **kwargs)


@pytest.mark.parametrize("prompt", [5, None, b"bytes", ["a cat"]], ids=lambda p: f"t2i: prompt={p!r}")
def test_t2i_prompt_type(pipe, prompt):
    with pytest.raises(InputError, match=r"prompt must be a string"):
        pipe.text_to_image(prompt, **SMALL)


def nan_image(shape=(1, 64, 64, 3)):
    image = torch.rand(*shape)
    image[0, 0, 0, 0] = NAN
    return image


MEDIA_CASES = [
    ("i2v: start_image with NaN", lambda p: p.text_to_video("a boat", width=64, height=64, num_frames=5, steps=1,
                                                           start_image=nan_image(), resolution="video_192p"),
     r"start_image contains NaN or infinite values"),
    ("i2v: start_image with Inf", lambda p: p.text_to_video("a boat", width=64, height=64, num_frames=5, steps=1,
                                                           start_image=torch.full((1, 64, 64, 3), INF),
                                                           resolution="video_192p"),
     r"start_image contains NaN or infinite values"),
    ("image edit: image with NaN", lambda p: p.edit_image(nan_image(), "make it blue", resolution="image_256res", steps=1),
     r"image contains NaN"),
    ("video edit: video with NaN", lambda p: p.edit_video(nan_image((5, 64, 64, 3)), "make it blue",
                                                          resolution="video_192p", steps=1),
     r"video contains NaN"),
    ("video edit: fps=NaN", lambda p: p.edit_video(torch.rand(5, 64, 64, 3), "x", resolution="video_192p", steps=1, fps=NAN),
     r"fps must be a finite number, got nan"),
    ("video edit: fps=0", lambda p: p.edit_video(torch.rand(5, 64, 64, 3), "x", resolution="video_192p", steps=1, fps=0),
     r"fps must be > 0.0, got 0.0"),
    ("video edit: fps='12'", lambda p: p.edit_video(torch.rand(5, 64, 64, 3), "x", resolution="video_192p", steps=1, fps="12"),
     r"fps must be a number, got '12'"),
    ("video edit: video as int tensor", lambda p: p.edit_video(torch.ones(5, 64, 64, 3, dtype=torch.bool), "x",
                                                               resolution="video_192p", steps=1),
     r"video must be a real-valued tensor"),
    ("image edit: image={'a': 1}", lambda p: p.edit_image({"a": 1}, "x", resolution="image_256res", steps=1),
     r"image must be an image tensor"),
    ("prepare_edit: video='yes'", lambda p: p.prepare_edit(torch.rand(1, 64, 64, 3), "x", video="yes",
                                                                      resolution="image_256res"),
     r"video must be True or False"),
    ("t2v: num_frames=True", lambda p: p.text_to_video("a boat", width=64, height=64, num_frames=True, steps=1),
     r"num_frames must be an integer >= 1, got True"),
    ("t2v: num_frames='61'", lambda p: p.text_to_video("a boat", width=64, height=64, num_frames="61", steps=1),
     r"num_frames must be an integer >= 1"),
    ("t2v: num_frames=1000", lambda p: p.text_to_video("a boat", width=64, height=64, num_frames=1000, steps=1),
     r"num_frames 1000 exceeds the model's maximum of 121"),
    ("t2v: resolution=5", lambda p: p.text_to_video("a boat", width=64, height=64, num_frames=5, steps=1,
                                                   start_image=torch.rand(1, 64, 64, 3), resolution=5),
     r"unknown resolution preset 5"),
]


@pytest.mark.parametrize("case, call, message", MEDIA_CASES, ids=[c for c, _, _ in MEDIA_CASES])
def test_media_and_video_arguments(pipe, case, call, message):
    with pytest.raises(InputError, match=message):
        call(pipe)


IMAGE = torch.rand(1, 64, 64, 3)
UNDERSTAND_CASES = [
    ("max_new_tokens", 0, r"max_new_tokens must be an integer in 1\.\.16384, got 0"),
    ("max_new_tokens", 10**7, r"max_new_tokens must be an integer in 1\.\.16384, got 10000000"),
    ("max_new_tokens", "5", r"max_new_tokens must be an integer .*'5' \(str\)"),
    ("max_new_tokens", True, r"max_new_tokens must be an integer .*True \(bool\)"),
    ("sampling", SamplingOptions(temperature=NAN), r"temperature must be a finite number, got nan"),
    ("sampling", SamplingOptions(temperature=-1.0), r"temperature must be in \[0.0"),
    ("sampling", SamplingOptions(temperature=1.0, top_p=NAN), r"top_p must be a finite number"),
    ("sampling", SamplingOptions(temperature=1.0, top_p=1.5), r"top_p must be in \[0.0, 1.0\]"),
    ("sampling", SamplingOptions(top_k=-1), r"top_k must be an integer >= 0"),
    ("sampling", SamplingOptions(top_k=1.5), r"top_k must be an integer"),
    ("sampling", SamplingOptions(repetition_penalty=INF), r"repetition_penalty must be a finite number"),
    ("sampling", SamplingOptions(temperature=1.0, seed=-1), r"sampling seed must be an integer in 0\.\."),
    ("sampling", {"temperature": 1.0}, r"sampling must be SamplingOptions or None, got dict"),
    ("fps", NAN, r"fps must be a finite number, got nan"),
    ("stop_tokens", "<|im_end|>", r"stop_tokens must be a tuple of token strings, got str"),
    ("stop_tokens", ("not a token",), r"stop_tokens: 'not a token' is not a single token"),
    ("include_history", "no", r"include_history must be True or False"),
    ("cancel", "stop", r"cancel must be a function or None, got str"),
    ("on_token", 1, r"on_token must be a function or None, got int"),
    ("context", {"turns": []}, r"context must be a LanceContext"),
    ("resolution", "8k", r"unknown resolution preset '8k'"),
    ("question", 5, r"question must be a string, got int"),
    ("instruction", 5, r"instruction must be a string, got int"),
]


def _short(name, value) -> str:
    """`sampling.temperature=nan` rather than the whole SamplingOptions repr."""
    if isinstance(value, SamplingOptions):
        default = SamplingOptions()
        changed = [f"{name}.{k}={getattr(value, k)!r}" for k in vars(value) if getattr(value, k) != getattr(default, k)
                   or getattr(value, k) != getattr(value, k)]
        return ", ".join(changed)
    return f"{name}={value!r}"


@pytest.mark.parametrize("name, value, message", UNDERSTAND_CASES,
                         ids=[f"understand: {_short(n, v)}" for n, v, _ in UNDERSTAND_CASES])
def test_understand_bad_argument(pipe, name, value, message):
    kwargs = dict(max_new_tokens=2, resolution="image_256res")
    kwargs[name] = value
    question = kwargs.pop("question", "What is it?")
    media = torch.rand(5, 64, 64, 3) if name == "fps" else IMAGE
    with pytest.raises(InputError, match=message):
        pipe.understand(media, question, **kwargs)


ENHANCE_CASES = [
    ("target", "audio", r"target must be one of \['image', 'video'\]"),
    ("max_new_tokens", 0, r"max_new_tokens must be an integer in 1\.\."),
    ("max_new_tokens", 2.5, r"max_new_tokens must be an integer"),
    ("cancel", 3, r"cancel must be a function or None"),
]


@pytest.mark.parametrize("name, value, message", ENHANCE_CASES,
                         ids=[f"enhance_prompt: {n}={v!r}" for n, v, _ in ENHANCE_CASES])
def test_enhance_prompt_bad_argument(pipe, name, value, message):
    with pytest.raises(InputError, match=message):
        pipe.enhance_prompt("a cat", **{name: value})


def test_seed_wraps_modulo_2_64(pipe):
    """seed 2^64-1 with batch 2 uses seeds 2^64-1 and 0 (documented in GenerationSettings.validate)."""
    top = 2**64 - 1
    both = pipe.text_to_image("a red cat", seed=top, batch_size=2, decode=False, **SMALL).latents
    first = pipe.text_to_image("a red cat", seed=top, decode=False, **SMALL).latents
    wrapped = pipe.text_to_image("a red cat", seed=0, decode=False, **SMALL).latents
    # batched vs single-sample matmuls round differently (~1e-5); another seed differs by O(1)
    assert torch.allclose(both[0], first[0], atol=1e-3) and torch.allclose(both[1], wrapped[0], atol=1e-3)
    assert not torch.allclose(first[0], wrapped[0], atol=1e-1)


def test_generate_checks_settings_inputs_and_noise(pipe):
    from lance_model import GenerationSettings
    inputs = pipe.prepare_text_to_image("a red cat", 64, 64)
    tokens, channels = inputs.target.tokens, pipe.config.constants.latent_channels
    with pytest.raises(InputError, match=r"settings must be GenerationSettings, got dict"):
        pipe.generate("t2i", "a red cat", inputs, {"steps": 2})
    with pytest.raises(InputError, match=r"inputs must come from a prepare_\* method, got str"):
        pipe.generate("t2i", "a red cat", "inputs", GenerationSettings(steps=2))
    settings = GenerationSettings(steps=2)
    settings.cfg_renorm_min = NAN  # set after construction: generate validates again
    with pytest.raises(InputError, match=r"cfg_renorm_min must be a finite number"):
        pipe.generate("t2i", "a red cat", inputs, settings)
    bad_noise = torch.zeros(1, tokens, channels)
    bad_noise[0, 0, 0] = INF
    with pytest.raises(InputError, match=r"noise contains NaN or infinite values"):
        pipe.generate("t2i", "a red cat", inputs, GenerationSettings(steps=2), noise=bad_noise)
    with pytest.raises(InputError, match=rf"noise must be \[B, {tokens}, {channels}\]"):
        pipe.generate("t2i", "a red cat", inputs, GenerationSettings(steps=2), noise=torch.zeros(1, tokens + 1, channels))


# ------------------------------------------------------------------------------------------- 4. bounds, memory
def _latent(pipe, t=1, h=4, w=4, b=1):
    return torch.zeros(b, pipe.config.constants.latent_channels, 1, 1, 1).expand(b, -1, t, h, w)


DECODE_CASES = [
    ("4096x4096 latent", dict(h=4096, w=4096), r"outside what the model supports.*1\.\.64 latent rows/columns \(1024 px\)"),
    ("65x4 latent", dict(h=65), r"outside what the model supports"),
    ("32 latent frames", dict(t=32), r"outside what the model supports.*1\.\.31 latent frames \(121 video frames\)"),
    ("batch of 65", dict(b=65), r"outside what the model supports: batch 1\.\.64"),
]


@pytest.mark.parametrize("case, shape, message", DECODE_CASES, ids=[f"decode_latents: {c}" for c, _, _ in DECODE_CASES])
def test_decode_latents_bounds(pipe, case, shape, message):
    with pytest.raises(InputError, match=message):
        pipe.decode_latents(_latent(pipe, **shape))


def test_decode_latents_values_and_layout(pipe):
    c = pipe.config.constants.latent_channels
    nan = torch.zeros(1, c, 1, 4, 4)
    nan[0, 0, 0, 0, 0] = NAN
    for latents, message in [(nan, r"latents contains NaN or infinite values"),
                             (torch.full((1, c, 1, 4, 4), INF), r"latents contains NaN or infinite values"),
                             (torch.zeros(1, c, 1, 4, 4, dtype=torch.long), r"latents must be a floating-point tensor"),
                             (torch.zeros(1, c + 1, 1, 4, 4), rf"latents must be \[B, {c}, t, h, w\]"),
                             (torch.zeros(c, 1, 4, 4), rf"latents must be \[B, {c}, t, h, w\]"),
                             ([[0.0]], r"latents must be a torch tensor, got list")]:
        with pytest.raises(InputError, match=message):
            pipe.decode_latents(latents)


def test_request_refused_up_front_when_memory_is_short(pipe, monkeypatch):
    import lance_model.runtime.memory as memory
    calls = []
    monkeypatch.setattr(memory, "available_bytes", lambda device: calls.append(device) or 1024)  # 1 KiB: below any request
    with pytest.raises(OutOfMemory, match=r"not enough memory on cpu .*needs at least [\d.]+ [KMG]iB .*only 1.00 KiB are "
                                          r"available.*memory='offload'.*vae_tiling"):
        pipe.text_to_image("a red cat", on_step=lambda *a: pytest.fail("sampling started"), **SMALL)
    with pytest.raises(OutOfMemory, match=r"text decoding stage"):
        pipe.understand(IMAGE, "What is it?", max_new_tokens=2, resolution="image_256res")
    with pytest.raises(OutOfMemory, match=r"VAE decode stage"):
        pipe.decode_latents(torch.zeros(1, pipe.config.constants.latent_channels, 1, 4, 4))
    monkeypatch.undo()
    assert calls and pipe.text_to_image("a red cat", **SMALL).frames is not None


def test_max_new_tokens_within_limit_but_beyond_positions(pipe, monkeypatch):
    monkeypatch.setattr(pipe.llm, "config", replace(pipe.config, max_positions=40))
    with pytest.raises(InputError, match=r"max_new_tokens 100 \+ the prompt's \d+ tokens exceed the model's 40 positions"):
        pipe.understand(None, "What is a cat?", max_new_tokens=100)


def test_release_size_estimates_admit_768px_t2i_on_24_gb_and_refuse_huge_token_budgets(golden):
    """Release architecture (Qwen2.5-VL-3B x 2 experts, bf16) on a 24 GB GPU: weights plus the largest stage of a
    768x768 t2i with CFG must fit; a 10^7-token KV cache must not."""
    raw = json.loads((golden.checkpoint / "Lance_3B" / "llm_config.json").read_text())
    raw.update(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    cfg = LLMConfig.from_dict(raw)
    with torch.device("meta"):
        llm_params = numel(LanceLLM(replace(cfg, num_layers=0))) + cfg.num_layers * numel(MoTDecoderLayer(cfg, TorchOps))
    vit_vae_params = 0.67e9 + 0.7e9          # Qwen2.5-VL ViT and Wan2.2 VAE, released sizes (approximate)
    weights = (llm_params + vit_vae_params) * 2
    available = 24 * GIB - weights - 1 * GIB  # CUDA context and allocator slack
    target, prefix = 48 * 48 + 2, 160
    estimate = (Estimate()
                .add("sampling", "KV cache", kv_cache_bytes(cfg, 2, prefix + target, torch.bfloat16))
                .add("sampling", "activations", forward_activation_bytes(cfg, target, torch.bfloat16))
                .add("VAE decode", "VAE", vae_decode_bytes(256, 1, 768, 768, 1, torch.bfloat16, False)))
    stage, need = estimate.peak()
    print(f"[memory] release weights {weights / GIB:.1f} GiB, 768^2 t2i peak stage {stage} {need / GIB:.2f} GiB, "
          f"available {available / GIB:.1f} GiB")
    assert available > 0 and need < available
    estimate.check(torch.device("cuda"), available=int(available))
    huge = Estimate().add("text decoding", "KV cache", kv_cache_bytes(cfg, 1, 10**7, torch.bfloat16))
    with pytest.raises(OutOfMemory, match=r"KV cache"):
        huge.check(torch.device("cuda"), available=int(available))


# ------------------------------------------------------------------------------------------- 5. interrupts
def cancel_after(polls: int):
    """cancel() that answers True from its `polls`+1-th call on; counts its calls."""
    state = {"calls": 0}

    def cancel():
        state["calls"] += 1
        return state["calls"] > polls
    cancel.state = state
    return cancel


def test_cancel_mid_decode_then_identical_decode(pipe):
    video = pipe.text_to_video("a boat", width=64, height=64, num_frames=13, steps=1, seed=5, decode=False).latents
    reference = pipe.decode_latents(video)
    cancel = cancel_after(1)  # the decoder runs once per latent frame: stop before the second
    with pytest.raises(Cancelled, match=r"cancelled during VAE decode"):
        pipe.decode_latents(video, cancel=cancel)
    assert cancel.state["calls"] == 2
    assert torch.equal(pipe.decode_latents(video), reference)


def test_cancel_inside_the_first_denoising_step_then_identical_run(pipe):
    reference = pipe.text_to_image("a red cat", seed=9, **SMALL).frames
    cancel = cancel_after(3)  # step 1's check, then prefill and step layers poll before every LLM layer
    pipe.prefixes.clear()     # the reference run's stored prefixes would skip the prefill (and its polls)
    with pytest.raises(Cancelled, match=r"cancelled during LLM layer \d"):
        pipe.text_to_image("a red cat", seed=9, cancel=cancel, **SMALL)
    assert torch.equal(pipe.text_to_image("a red cat", seed=9, **SMALL).frames, reference)


def test_cancel_during_vae_encode_and_vit(pipe):
    with pytest.raises(Cancelled, match=r"cancelled during VAE encode"):
        pipe.edit_image(torch.rand(1, 64, 64, 3), "make it blue", resolution="image_256res", steps=1, cancel=lambda: True)
    with pytest.raises(Cancelled, match=r"cancelled during ViT block 0"):
        pipe.understand(IMAGE, "What is it?", max_new_tokens=2, resolution="image_256res", cancel=lambda: True)
    with pytest.raises(Cancelled, match=r"cancelled during LLM layer 0"):
        pipe.understand(None, "What is a cat?", max_new_tokens=2, cancel=lambda: True)
    assert pipe.understand(IMAGE, "What is it?", max_new_tokens=2, resolution="image_256res").token_ids


def test_cancel_hooks_are_removed_after_the_call(pipe):
    pipe.text_to_image("a red cat", cancel=lambda: False, **SMALL)
    modules = [pipe.vae.module.decoder, pipe.vae.module.encoder, *pipe.llm.language_model.model.layers, *pipe.vit.module.blocks]
    assert all(not m._forward_pre_hooks for m in modules)


# ------------------------------------------------------------------------------------------- 6. concurrency
def test_two_threads_on_one_pipeline_get_their_own_results(pipe):
    def run(seed):
        return pipe.text_to_video("a boat", width=64, height=64, num_frames=9, steps=2, seed=seed).frames

    expected = {seed: run(seed) for seed in (1, 2)}
    for _ in range(3):
        results, errors = {}, []

        def worker(seed):
            try:
                results[seed] = run(seed)
            except Exception as exc:  # reported below with the seed
                errors.append((seed, repr(exc)))
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert all(torch.equal(results[seed], expected[seed]) for seed in (1, 2))


# ------------------------------------------------------------------------------------------- 7. out of memory
def _raise_oom(module, args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


CLEAR_OOM = r"ran out of memory on cpu .*memory='auto'.*memory='offload'.*vae_tiling.*still loaded"
OOM_SITES = [
    ("t2i: LLM layer", lambda p: p.llm.language_model.model.layers[-1].mlp,
     lambda p: p.text_to_image("a red cat", seed=4, **SMALL).frames, CLEAR_OOM),
    # after sampling: the decode is retried tiled, then the error keeps the sampled latents
    ("t2i: VAE decoder", lambda p: p.vae.module.decoder,
     lambda p: p.text_to_image("a red cat", seed=4, **SMALL).frames,
     r"decoding its latents ran out of memory on cpu, untiled \(.*\) and tiled \(.*\); the latents are kept"),
    ("image edit: VAE encoder", lambda p: p.vae.module.encoder,
     lambda p: p.edit_image(torch.ones(1, 64, 64, 3) / 2, "make it blue", resolution="image_256res", steps=1).frames,
     CLEAR_OOM),
    ("understand: ViT", lambda p: p.vit.module.blocks[0],
     lambda p: torch.tensor(p.understand(IMAGE, "What is it?", max_new_tokens=3, resolution="image_256res").token_ids),
     CLEAR_OOM),
    ("understand: LLM layer", lambda p: p.llm.language_model.model.layers[0],
     lambda p: torch.tensor(p.understand(None, "What is a cat?", max_new_tokens=3).token_ids), CLEAR_OOM),
]


@pytest.mark.parametrize("case, module, call, expect", OOM_SITES, ids=[f"out of memory: {c[0]}" for c in OOM_SITES])
def test_out_of_memory_is_clear_and_the_model_stays_usable(pipe, case, module, call, expect):
    reference = call(pipe)
    pipe.encodings.clear()   # the reference run's stored source encoding would skip the VAE encoder
    handle = module(pipe).register_forward_pre_hook(_raise_oom)
    try:
        with pytest.raises(OutOfMemory, match=expect) as error:
            call(pipe)
    finally:
        handle.remove()
    assert error.value.__context__ is None and error.value.__cause__ is None  # the failed call's frames are released
    assert not pipe.vae.module._feat_map or all(f is None for f in pipe.vae.module._feat_map)
    assert torch.equal(call(pipe), reference)


def test_decode_raw_latents_checks_before_normalizing(pipe):
    c = pipe.config.constants.latent_channels
    with pytest.raises(InputError, match=r"latents of shape \(1, \d+, 1, 4096, 4096\) is outside what the model supports"):
        pipe.decode_raw_latents(torch.zeros(1, c, 1, 1, 1).expand(1, c, 1, 4096, 4096))
    with pytest.raises(InputError, match=r"LATENT input contains NaN"):
        pipe.decode_raw_latents(torch.full((1, c, 1, 4, 4), NAN), what="LATENT input")
    result = pipe.text_to_image("a red cat", seed=2, **SMALL)
    assert torch.allclose(pipe.decode_raw_latents(result.comfy_latent()), result.frames, atol=1e-5)


def test_bad_vit_config_is_reported_before_the_llm_weights_are_read(golden, tmp_path, monkeypatch):
    root = copy_release(golden, tmp_path / "release")
    edit_json(root / "Qwen2.5-VL-ViT" / "config.json", {"depth": 8})
    import lance_model.runtime.loader as loader
    monkeypatch.setattr(loader, "load_llm", lambda *a, **k: pytest.fail("LLM weights read before the ViT check"))
    with pytest.raises(CheckpointError, match=r"'depth' is 8"):
        load_lance(root, dtype="fp32", device="cpu")


def test_host_make_room_hook_is_asked_before_refusing(pipe, monkeypatch):
    import lance_model.runtime.memory as memory
    free = {"bytes": 1024}
    asked = []

    def make_room(nbytes, device, scope):
        asked.append((nbytes, device.type))
        free["bytes"] = 64 * GIB   # the host unloaded something
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    monkeypatch.setattr(pipe.session, "make_room", make_room)
    assert pipe.text_to_image("a red cat", **SMALL).frames is not None
    assert len(asked) == 1 and asked[0][0] > 1024 and asked[0][1] == "cpu"


def test_top_p_zero_keeps_only_the_most_likely_token():
    """top_p 0 (the Understand node's widget minimum) is accepted: sampling then always picks the argmax."""
    from lance_model.runtime.decode_step import TokenChooser
    from lance_model.tasks.understanding import SamplingOptions
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0]).view(1, 1, -1)
    options = SamplingOptions(temperature=1.5, top_p=0.0, seed=0)
    options.validate()
    chooser = TokenChooser(options, 4, 4, torch.device("cpu"))
    assert {int(chooser(logits)) for _ in range(20)} == {1}
