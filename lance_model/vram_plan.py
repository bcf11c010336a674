"""Where the weights live on a GPU of a given size: the VRAM plan.

A plan says, per expert of the LLM, whether its weights stay on the device or stream from host memory layer by
layer (streaming.py), and in which storage dtype (bf16, or fp8 with per-channel scales: fp8.py); and whether the
ViT and the VAE stay on the device or visit it only while they run. The candidates are ordered fastest first and
the first whose device bytes (weights + stream slots + a working reserve for the request) fit the budget is used:

  * resident weights cost nothing per step; fp8 costs a dequantization per layer and step (cheap);
  * a streamed expert crosses PCIe once per forward (prefill, every denoising step, every decoded token): the
    understanding expert is half a layer (~172 MB bf16) and runs at every step over the two marker rows, so
    streaming it costs ~6 GB of copies per step at release size, which hides behind a video step (seconds) but
    not behind an image step (tens of ms);
  * so the plans keep experts resident in fp8 before they stream them, and stream the understanding expert before
    the generation expert, which carries the latent block.

The fp8 generation expert is offered only when asked for (`fp8_generation=True`): the quality gate (bench_fp8.py,
tests/test_vram_plan.py) measures it, but it is not the default until it passes the same gate as the understanding
expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import OutOfMemory
from .fp8 import store_experts_in_fp8
from .memory import (GIB, available_bytes, forward_activation_bytes, kv_cache_bytes, module_bytes, readable,
                     vae_decode_bytes)
from .streaming import LayerStreamer, stream_experts

STREAM_AHEAD = 2            # streamed layers in flight besides the one running
DEVICE_MARGIN = GIB // 2    # left free by an automatic budget (the CUDA context, fragmentation)
RESERVE_IMAGE_SIDE = 768    # a plan keeps room for the work of an image this size (larger requests are checked
                            # against the free memory when they come)


@dataclass(frozen=True)
class VramPlan:
    fp8: tuple[str, ...] = ()       # experts ("und", "gen") stored in fp8
    stream: tuple[str, ...] = ()    # experts streamed from host memory
    stages: bool = False            # ViT and VAE visit the device only while they run

    def describe(self) -> str:
        def expert(name, label):
            dtype = " in fp8" if name in self.fp8 else ""
            return f"{label} expert{dtype} {'streamed' if name in self.stream else 'resident'}"
        parts = [expert("und", "understanding"), expert("gen", "generation"),
                 "ViT/VAE visit while they run" if self.stages else "ViT/VAE resident"]
        return "; ".join(parts)


RESIDENT = VramPlan()


def candidates(fp8_generation: bool = False) -> list[VramPlan]:
    """Fastest first; each smaller than the one before (a plan both slower and larger than another is left out)."""
    staged = [VramPlan(), VramPlan(stages=True), VramPlan(fp8=("und",), stages=True)]
    if not fp8_generation:
        return staged + [VramPlan(fp8=("und",), stream=("und",), stages=True),
                         VramPlan(fp8=("und",), stream=("und", "gen"), stages=True)]
    both = ("und", "gen")
    return staged + [VramPlan(fp8=both, stages=True), VramPlan(fp8=both, stream=("und",), stages=True),
                     VramPlan(fp8=both, stream=both, stages=True)]


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


def choose_plan(budget: int, sizes: WeightBytes, working: int, fp8_generation: bool = False) -> VramPlan:
    """The fastest plan whose weights plus `working` bytes (the request's KV cache, activations, VAE decode) fit
    `budget`; OutOfMemory naming the smallest plan and what it needs when none does."""
    plans = candidates(fp8_generation)
    for plan in plans:
        if sizes.device_bytes(plan) + working <= budget:
            return plan
    smallest = plans[-1]
    raise OutOfMemory(f"no weight plan fits {readable(budget)} of device memory: the smallest ({smallest.describe()}) "
                      f"needs {readable(sizes.device_bytes(smallest))} of weights plus {readable(working)} to work "
                      f"in{'' if fp8_generation else '; fp8_generation=True allows a smaller one'}; give it more "
                      f"memory (vram_budget), or use memory='offload'")


def working_reserve(cfg, decoder_width: int, dtype: torch.dtype, side: int = RESERVE_IMAGE_SIDE) -> int:
    """Bytes a guided t2i request of side x side pixels needs besides the weights: the larger of its sampling
    stage (both branches' KV cache, one forward) and its decode stage (memory.py's lower bounds)."""
    c = cfg.constants
    tokens = (side // c.vae_spatial_factor) ** 2 + 2
    sampling = kv_cache_bytes(cfg, 2, tokens + 256, dtype) + forward_activation_bytes(cfg, 2 * tokens, dtype)
    decode = vae_decode_bytes(decoder_width, 1, side, side, 1, dtype, tiled=False)
    return max(sampling, decode)


def device_budget(device: torch.device) -> int | None:
    """Memory the device can still give (memory.available_bytes: within a per-process fraction when one is set)
    minus a margin (None off CUDA: no plan is needed on the CPU)."""
    if device.type != "cuda":
        return None
    return max(available_bytes(device) - DEVICE_MARGIN, 0)


def apply_plan(llm: nn.Module, plan: VramPlan, device: torch.device) -> LayerStreamer | None:
    """Store the plan's experts in fp8, stream its streamed experts from host memory, and move every other LLM
    weight and buffer to `device` (the streamed ones never visit it whole)."""
    if plan.fp8:
        store_experts_in_fp8(llm, plan.fp8)
    streamer = stream_experts(llm, plan.stream, device, STREAM_AHEAD) if plan.stream else None
    streamed = {id(p) for stream in streamer.experts.values() for params in stream.params for p in params} \
        if streamer else set()
    for module in llm.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in streamed:
                param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return streamer
