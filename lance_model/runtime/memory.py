"""Up-front memory estimates of a request, checked against what the device has before any work starts.

The estimates are deliberately LOW (lower bounds of the big buffers, not peaks): a request is refused only when it
cannot possibly fit, never because the estimate was pessimistic. What is counted:
  * LLM stage: the KV cache (exact: it is preallocated) + one forward's activations of the longest block
    (hidden states, q/k/v, fp32 rotary, one MLP chunk; attention scores are not counted, fused kernels avoid them),
  * VAE stage: the decoder/encoder working set of one call (the Wan2.2 decoder is called once per latent frame:
    the first gives one frame, each other `temporal_factor` frames at once; measured in vae.py on a video, ~12.6 KB
    per output pixel in bf16 at width 256 for a call of 4 frames; half of that is used here) + the output,
  * in offload mode, the stage's weights, which visit the device only while the stage runs.
Stages run one after another, so a request needs the largest stage, not their sum.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import OutOfMemory
from ..nn.config import LLMConfig
from .devices import indexed

log = logging.getLogger(__name__)
GIB = 1 << 30
MEMINFO = Path("/proc/meminfo")
DECODER_BYTES_PER_PIXEL_PER_WIDTH = 3    # x decoder_base_dim x dtype bytes, per pixel of each frame one call makes
ENCODER_BYTES_PER_PIXEL_PER_WIDTH = 6    # x base_dim x dtype bytes, per input pixel of one frame
TILE_SIDE = 256                          # enable_tiling's default tile (vae.py)
HINT = ("load the model with memory='auto' (a VRAM plan: ViT and VAE staged, experts streamed) or memory='offload' "
        "(weights stay in CPU memory between stages), turn on vae_tiling, or ask for a smaller width/height, fewer "
        "frames, a smaller batch_size or fewer max_new_tokens")


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: CUDA free memory plus what PyTorch's allocator holds unused (within
    a per-process fraction when one is set); on CPU MemAvailable from /proc/meminfo. None where unknown (then
    nothing is refused)."""
    if device.type == "cuda":
        device = indexed(device)
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        available = free + torch.cuda.memory_reserved(device) - allocated
        # newer torch only; it requires the index, as set_per_process_memory_fraction does
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        return int(min(available, fraction * total - allocated))
    if device.type == "cpu":
        try:
            for line in MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


@dataclass
class Estimate:
    """Bytes per stage; each stage is a dict part -> bytes."""

    stages: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, stage: str, part: str, nbytes: int) -> "Estimate":
        self.stages.setdefault(stage, {})[part] = self.stages.get(stage, {}).get(part, 0) + int(nbytes)
        return self

    def peak(self) -> tuple[str, int]:
        if not self.stages:
            return "", 0
        stage = max(self.stages, key=lambda s: sum(self.stages[s].values()))
        return stage, sum(self.stages[stage].values())

    def check(self, device: torch.device, available: int | None = None,
              make_room: Callable[[int, torch.device], None] | None = None, plan: str = "") -> None:
        """Raise OutOfMemory when the largest stage cannot fit into the device's available memory. `make_room`
        (a host's hook, e.g. one that unloads its other models) is asked for the bytes first when they are short;
        `plan` (where the weights are) is named in the error."""
        stage, need = self.peak()
        available = available_bytes(device) if available is None else available
        if available is not None and need > available and make_room is not None:
            make_room(need, device)
            available = available_bytes(device)
        if available is None or need <= available:
            return
        parts = ", ".join(f"{name} {readable(nbytes)}" for name, nbytes in self.stages[stage].items() if nbytes)
        shortfall = (f"its {stage} stage needs at least {readable(need)} ({parts}) but only {readable(available)} "
                     f"are available")
        tried = f" with {plan}" if plan else ""
        raise OutOfMemory(f"not enough memory on {device} for this request{tried}: {shortfall}; {HINT}",
                          facts=f"not enough memory on {device} for this request: {shortfall}")


def kv_cache_bytes(cfg: LLMConfig, rows: int, capacity: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * rows * cfg.num_kv_heads * capacity * cfg.head_dim * _size(dtype)


def forward_activation_bytes(cfg: LLMConfig, tokens: int, dtype: torch.dtype, mlp_chunk: int = 8192) -> int:
    """One decoder-layer forward over `tokens` query tokens (all batch rows together)."""
    width = _size(dtype)
    hidden = 6 * tokens * cfg.hidden_size * width                        # input, residual, norm, attn out, o_proj, sum
    qkv = tokens * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * (width + 4)  # q/k/v + fp32 rotary copies
    rope = 2 * tokens * cfg.head_dim * 4
    mlp = 3 * min(tokens, mlp_chunk) * cfg.intermediate_size * width
    return hidden + qkv + rope + mlp


def vae_decode_bytes(decoder_width: int, frames: int, height: int, width: int, batch: int, dtype: torch.dtype,
                     tiled: bool, temporal_factor: int = 1) -> int:
    """Decoding [batch] clips of `frames` frames at height x width pixels (a video's decoder calls make
    `temporal_factor` frames each, an image's one)."""
    area = min(height, TILE_SIDE) * min(width, TILE_SIDE) if tiled else height * width
    frames_per_call = 1 if frames == 1 else temporal_factor
    working = DECODER_BYTES_PER_PIXEL_PER_WIDTH * decoder_width * _size(dtype) * area * frames_per_call * batch
    output = 2 * 3 * frames * height * width * 4 * batch                  # fp32 pixels + the clamped/permuted copy
    return working + output


def vae_encode_bytes(encoder_width: int, frames: int, height: int, width: int, dtype: torch.dtype, tiled: bool) -> int:
    area = min(height, TILE_SIDE) * min(width, TILE_SIDE) if tiled else height * width
    return ENCODER_BYTES_PER_PIXEL_PER_WIDTH * encoder_width * _size(dtype) * area + 3 * frames * height * width * 4


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def readable(nbytes: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} bytes"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
