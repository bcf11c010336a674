"""Loading a release: every config checked against its weight header first, then the modules built on the meta
device and the weights streamed into them (VAE, LLM, tokenizer, ViT), as one session."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InputError
from ..io.validation import require_bool, require_int
from ..nn.attention import Attention
from ..nn.checkpoint import (
    ReleasePaths,
    assert_no_meta,
    check_state_keys,
    materialize,
    resolve_release,
    safetensors_keys,
    stream_safetensors,
)
from ..nn.config import LLMConfig
from ..nn.fp8 import EXPERTS
from ..nn.llm import LanceLLM, MoTDecoderLayer
from ..nn.ops import TorchOps
from ..nn.size_check import check_elements, check_layers, file_elements, layer_count, numel
from ..nn.tokenizer import LanceTokenizer
from ..nn.vae import load_vae
from ..nn.vit import check_vit_files, load_vit
from .devices import resolve_device, resolve_dtype
from .memory import readable
from .session import MEMORY_MODES, LanceSession
from .streaming import LayerStreamer
from .vram_plan import (
    RESERVE_IMAGE_SIDE,
    VramPlan,
    WeightBytes,
    apply_plan,
    choose_plan,
    device_budget,
    working_reserve,
)

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
             attention: Attention | None = None, checked: tuple | None = None) -> LanceLLM:
    """`checked`: check_llm_files' result when the caller already ran it."""
    cfg, found = checked or check_llm_files(paths, ops)
    with torch.device("meta"):
        llm = LanceLLM(cfg, ops, attention)
    expected = {key: tuple(t.shape) for key, t in llm.state_dict().items()}
    check_state_keys(paths.llm_weights, expected, found, ignore=_ignored)
    materialize(llm, stream_safetensors(paths.llm_weights, [(k, k) for k in expected], dtype, device))
    assert_no_meta(llm, str(paths.llm_weights))
    log.info("loaded Lance LLM from %s (%d tensors, %s, %s)", paths.llm_weights, len(expected), dtype, device)
    return llm.eval().requires_grad_(False)


def load_session(root: str | Path, *, variant: str = "auto", dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "auto", attention: str = "auto", operations=None,
                 memory: str = "resident", vit_weights: str = "vit", vae_tiling: bool = False,
                 weights_device: str | torch.device | None = None, vram_budget: int | None = None,
                 fp8: tuple[str, ...] = (), compile: bool = False, defer_placement: bool = False) -> LanceSession:
    """See pipeline.load_lance."""
    if not isinstance(root, (str, Path)):
        raise InputError(f"root must be the path of a Lance release folder (a str or pathlib.Path), got "
                         f"{type(root).__name__}")
    check_memory_options(memory, vit_weights, vram_budget, fp8)
    require_bool(vae_tiling, "vae_tiling")
    execution_device = resolve_device(device, "device")
    dtype = resolve_dtype(dtype, execution_device)
    planned = memory in ("stream", "auto") or bool(fp8)
    if memory == "offload" or planned:
        load_device = torch.device("cpu")   # a plan places the weights itself, after the load
    else:
        load_device = resolve_device(weights_device, "weights_device") if weights_device is not None else execution_device
    paths = resolve_release(root, variant)
    file_state = paths.snapshot()   # before reading: a file replaced during the load counts as changed
    ops = operations or TorchOps
    # every config against its weight header first: a broken ViT config must not wait for the LLM to load
    lance_vit = paths.llm_weights if vit_weights == "lance" else None
    llm_files = check_llm_files(paths, ops)
    vit_files = check_vit_files(paths.vit_config.parent, lance_vit)
    # the VAE first: its .pth is read through a memory map whose pages stay resident until its load ends, which
    # then adds to the smallest total (and a broken VAE file fails before the LLM is read)
    vae = load_vae(paths.vae_weights, dtype, load_device)
    if vae.z_dim != llm_files[0].constants.latent_channels:
        raise InputError(f"VAE latent channels {vae.z_dim} do not match the model's {llm_files[0].constants.latent_channels}")
    if vae_tiling:
        vae.enable_tiling()
    llm = load_llm(paths, dtype, load_device, ops, Attention(attention), checked=llm_files)
    tokenizer = LanceTokenizer(paths.lance_dir, llm.config)
    vit = load_vit(paths.vit_config.parent, dtype, load_device, lance_weights=lance_vit, checked=vit_files)
    if vit.out_hidden_size != llm.config.hidden_size:
        raise InputError(f"ViT output width {vit.out_hidden_size} does not match the LLM hidden size {llm.config.hidden_size}")
    plan, streamer = prepare_plan(memory, llm, vit, vae, execution_device, vram_budget, tuple(fp8)) \
        if planned else (None, None)
    if require_bool(compile, "compile") and streamer is not None:
        log.info("compile: not with streamed weights (they move per layer); denoising steps run eagerly")
    elif compile:
        llm.compile_steps()
    log.info("Lance loaded from %s (%s, %s, %s, attention=%s, memory=%s, ViT weights from %s)", paths.root,
             paths.lance_dir.name, dtype, execution_device, llm.attention.name, memory,
             paths.llm_weights.name + " vit_model.*" if vit_weights == "lance" else "Qwen2.5-VL-ViT/vit.safetensors")
    # a plan's weights were loaded into host memory: the session puts on the device what the plan keeps there
    session = LanceSession(paths, llm, tokenizer, vit, vae, memory, execution_device, file_state, plan, streamer)
    if not require_bool(defer_placement, "defer_placement"):
        session.place_weights()
    return session


def check_memory_options(memory, vit_weights, vram_budget, fp8) -> None:
    if memory not in MEMORY_MODES:
        raise InputError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if vit_weights not in ("vit", "lance"):
        raise InputError(f"vit_weights must be 'vit' or 'lance', got {vit_weights!r}")
    if vram_budget is not None:
        require_int(vram_budget, "vram_budget", 1)
        if memory != "auto":
            raise InputError(f"vram_budget is the budget of memory='auto' (the VRAM plan); memory={memory!r} "
                             f"does not use it")
    if not isinstance(fp8, (tuple, list)) or any(expert not in EXPERTS for expert in fp8):
        raise InputError(f"fp8 must be a tuple of experts among {EXPERTS} (stored in fp8), got {fp8!r}")
    if fp8 and memory == "offload":
        raise InputError("fp8 weights need memory 'resident', 'stream' or 'auto' (offload moves whole stages)")


def prepare_plan(memory: str, llm, vit, vae, device: torch.device, budget: int | None,
                 fp8: tuple[str, ...]) -> tuple[VramPlan, LayerStreamer | None]:
    """Modules loaded in host memory -> a VRAM plan (pick_plan) with its experts stored in fp8 where asked and its
    streamed experts packed into host slabs; the session places the rest (LanceSession.place_weights): the LLM's
    other weights on the device, the ViT and VAE there too or left in host memory to visit as stages."""
    plan = pick_plan(memory, llm, vit, vae, device, budget, fp8)
    return plan, apply_plan(llm, plan, device)


def pick_plan(memory: str, llm, vit, vae, device: torch.device, budget: int | None,
              fp8: tuple[str, ...]) -> VramPlan:
    """stream: every expert streamed; auto: the fastest plan that fits the budget (default: the device's free
    memory; on the CPU, with no budget, everything stays resident); resident with fp8: only the fp8 storage. The
    experts in `fp8` are stored in fp8 in every case, and only they."""
    if memory == "stream":
        return VramPlan(fp8=fp8, stream=EXPERTS, stages=True)
    budget = budget if budget is not None else device_budget(device)
    if memory == "resident" or budget is None:
        return VramPlan(fp8=fp8)
    sizes = WeightBytes.of(llm, vit.module, vae.module)
    working = working_reserve(llm.config, int(vae.module.config.decoder_base_dim), llm.dtype)
    plan = choose_plan(budget, sizes, working, fp8)
    log.info("Lance VRAM plan for %s: %s (%s of weights on the device, %s kept for the work of a %d px image)",
             readable(budget), plan.describe(), readable(sizes.device_bytes(plan)), readable(working),
             RESERVE_IMAGE_SIDE)
    return plan
