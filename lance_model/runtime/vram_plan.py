"""Where the weights live on a GPU of a given size: the VRAM plan.

A plan says, per expert of the LLM, whether its weights stay on the device or stream from host memory layer by
layer (streaming.py), and in which storage dtype; and whether the ViT and the VAE stay on the device or visit it only
while they run. `memory="auto"` takes the first candidate (fastest first) whose device bytes (weights + stream slots
+ the working reserve of a 768^2 image) fit the budget. Every candidate is bit-exact - the same pixels as
everything resident - so a plan never trades quality for memory by itself:

  * resident weights cost nothing per step; staging the ViT and the VAE costs one move per run;
  * a streamed expert crosses PCIe once per forward in which its routing runs it (streaming.py copies only those):
    the understanding expert runs at every denoising step over the two marker rows, so streaming it costs ~5 GB of
    copies per step at release size, which hides behind a video step (seconds) but only partly behind an image
    step; so it streams before the generation expert, which carries the latent block.

fp8 storage (fp8.py; per-channel scales, dequantized per layer) halves an expert's bytes but changes the picture,
and has not been validated on the release's weights (random weights cannot show what it does to real pictures):
it enters a plan only when the caller asks for it (`fp8=("und",)` ...), and the plan says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..errors import OutOfMemory
from ..nn.fp8 import store_experts_in_fp8
from .memory import (
    GIB,
    available_bytes,
    forward_activation_bytes,
    kv_cache_bytes,
    module_bytes,
    readable,
    vae_decode_bytes,
)
from .streaming import LayerStreamer, stream_experts

log = logging.getLogger(__name__)

STREAM_AHEAD = 2            # streamed layers in flight besides the one running
DEVICE_MARGIN = GIB // 2    # left free by an automatic budget (the CUDA context, fragmentation)
RESERVE_IMAGE_SIDE = 768    # a plan keeps room for the work of an image this size (larger requests are checked
                            # against the free memory when they come)
# memory.py's estimates are lower bounds; a real run needs more (allocator blocks, temporaries they leave out). On
# an H200 (2026-12-04) a 768^2 t2i with every weight resident peaked 1.5 GiB above the weights, 1.75x memory.py's
# 0.86 GiB for that request (its decode stage): the plan's reserve is the estimate scaled by a little more.
PEAK_OVER_ESTIMATE = 1.8
FP8_WARNING = "fp8 weights change the picture and have not been validated on the release's weights"


@dataclass(frozen=True)
class VramPlan:
    fp8: tuple[str, ...] = ()       # experts ("und", "gen") stored in fp8 (only when the caller asked)
    stream: tuple[str, ...] = ()    # experts streamed from host memory
    stages: bool = False            # ViT and VAE visit the device only while they run

    def describe(self) -> str:
        def expert(name, label):
            dtype = " in fp8" if name in self.fp8 else ""
            return f"{label} expert{dtype} {'streamed' if name in self.stream else 'resident'}"
        parts = [expert("und", "understanding"), expert("gen", "generation"),
                 "ViT/VAE visit while they run" if self.stages else "ViT/VAE resident"]
        if self.fp8:
            parts.append(f"{FP8_WARNING} (asked for)")
        return "; ".join(parts)


def candidates(fp8: tuple[str, ...] = ()) -> list[VramPlan]:
    """Fastest first, each smaller than the one before; the experts in `fp8` (the caller's choice) are stored in
    fp8 in every one."""
    return [VramPlan(fp8), VramPlan(fp8, stages=True), VramPlan(fp8, stream=("und",), stages=True),
            VramPlan(fp8, stream=("und", "gen"), stages=True)]


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the release's weight groups in their compute dtype."""

    und: int          # the understanding expert of every layer
    gen: int          # the generation expert of every layer
    shared: int       # embeddings, lm_head, final norms, latent heads, time embedder
    vit: int
    vae: int
    layers: int

    @classmethod
    def of(cls, llm: nn.Module, vit: nn.Module, vae: nn.Module) -> "WeightBytes":
        layers = llm.language_model.model.layers
        und = sum(module_bytes(m) for layer in layers for m in layer.expert_modules(False))
        gen = sum(module_bytes(m) for layer in layers for m in layer.expert_modules(True))
        return cls(und, gen, module_bytes(llm) - und - gen, module_bytes(vit), module_bytes(vae), len(layers))

    def device_bytes(self, plan: VramPlan) -> int:
        """What the plan keeps on the device: resident weights, stream slots, and the larger of ViT and VAE when
        they visit one at a time."""
        total = self.shared
        for name, size in (("und", self.und), ("gen", self.gen)):
            size = size // 2 if name in plan.fp8 else size        # fp8: 1 byte a weight instead of 2 (scales aside)
            total += size * min(STREAM_AHEAD + 1, self.layers) // self.layers if name in plan.stream else size
        return total + (max(self.vit, self.vae) if plan.stages else self.vit + self.vae)


def choose_plan(budget: int, sizes: WeightBytes, working: int, fp8: tuple[str, ...] = ()) -> VramPlan:
    """The fastest plan whose weights plus `working` bytes (the request's KV cache, activations, VAE decode) fit
    `budget`; OutOfMemory naming the smallest plan and what it needs when none does."""
    plans = candidates(fp8)
    for plan in plans:
        if sizes.device_bytes(plan) + working <= budget:
            return plan
    smallest = plans[-1]
    raise OutOfMemory(f"no weight plan fits {readable(budget)} of device memory: the smallest ({smallest.describe()}) "
                      f"needs {readable(sizes.device_bytes(smallest))} of weights plus {readable(working)} to work "
                      f"in; give it more memory (vram_budget), or use memory='offload'")


def working_reserve(cfg, decoder_width: int, dtype: torch.dtype, side: int = RESERVE_IMAGE_SIDE) -> int:
    """Bytes a guided t2i request of side x side pixels really needs besides the weights: the larger of its
    sampling stage (both branches' KV cache, one forward) and its decode stage, as estimated by memory.py, scaled
    to the measured peak (PEAK_OVER_ESTIMATE)."""
    c = cfg.constants
    tokens = (side // c.vae_spatial_factor) ** 2 + 2
    sampling = kv_cache_bytes(cfg, 2, tokens + 256, dtype) + forward_activation_bytes(cfg, 2 * tokens, dtype)
    decode = vae_decode_bytes(decoder_width, 1, side, side, 1, dtype, tiled=False)
    return int(PEAK_OVER_ESTIMATE * max(sampling, decode))


def device_budget(device: torch.device) -> int | None:
    """Memory the device can still give (memory.available_bytes: within a per-process fraction when one is set)
    minus a margin (None off CUDA: no plan is needed on the CPU)."""
    if device.type != "cuda":
        return None
    return max(available_bytes(device) - DEVICE_MARGIN, 0)


def apply_plan(llm: nn.Module, plan: VramPlan, device: torch.device) -> LayerStreamer | None:
    """Store the plan's experts in fp8 (quantized on `device`) and pack its streamed experts into host slabs, for
    a streamer to `device` (the streamed weights never visit it whole). Placing the other weights is the session's
    (move_weights)."""
    if plan.fp8:
        log.warning("Lance: storing the %s expert(s) in fp8 as asked: %s", " and ".join(plan.fp8), FP8_WARNING)
        store_experts_in_fp8(llm, plan.fp8, device)
    return stream_experts(llm, plan.stream, device, STREAM_AHEAD) if plan.stream else None


def move_weights(modules: Iterable[nn.Module], device: torch.device, skip: set[int] = frozenset()) -> None:
    """Move each module's own parameters and buffers to `device`, but the tensors whose id is in `skip` (streamed
    ones). A parameter keeps its identity (its data is rebound), so a streamer or a compiled step holding it stays
    valid; only where torch cannot rebind (a device with tensors of another kind: lazy, XLA) it is replaced, as
    Module.to does there."""
    for module in modules:
        for name, param in module.named_parameters(recurse=False):
            if id(param) in skip:
                continue
            moved = param.data.to(device)
            if torch._has_compatible_shallow_copy_type(param.data, moved):
                param.data = moved
            else:
                module._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            if id(buffer) not in skip:
                module._buffers[name] = buffer.to(device)
