"""The Lance MoT language model: a Qwen2.5 decoder whose every per-layer weight exists twice (understanding
expert and `_moe_gen` generation expert). Attention is shared: all tokens attend jointly, only the projections,
norms and MLPs are chosen per token. Module names mirror the release checkpoint so weights map by key name.

A forward pass processes one *block* of tokens against a KV cache:
  * `causal=True`  - text; each token sees the cache and earlier tokens of the block,
  * `causal=False` - a visual block; bidirectional over the cache and the whole block.
Expert routing (`Routing`): the expert most rows of a block use runs over every row, and the other expert runs
over its few rows only (a visual block's two marker tokens), whose results are then written over the first
expert's. No gathering and reassembly of the large part of a block, and one call per expert.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Cancelled, first_line
from .attention import Attention
from .config import LLMConfig
from .kv_cache import KVCache
from .ops import TorchOps, norm_layer
from .positions import MultimodalRotary, Rope, timestep_sinusoid

log = logging.getLogger(__name__)
GEN = "_moe_gen"
PREFILL_CHUNK_TOKENS = 2048   # causal prefill blocks are cut into chunks of this many tokens at most


@dataclass(frozen=True)
class Routing:
    """Which expert each row of a block uses: `major_gen`'s expert for every row except `minor_rows` (an index
    tensor on the device; None when every row uses it), which use the other one."""

    major_gen: bool
    minor_rows: torch.Tensor | None = None

    @classmethod
    def of(cls, gen_mask: torch.Tensor, device: torch.device) -> "Routing":
        """From a per-row mask (True = generation expert)."""
        gen_rows = int(gen_mask.sum())
        major_gen = 2 * gen_rows > len(gen_mask)
        minor = torch.nonzero(gen_mask != major_gen).squeeze(1)
        return cls(major_gen, minor.to(device) if len(minor) else None)

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """The minor rows of [B, L, ...] (None when there are none)."""
        return None if self.minor_rows is None else x.index_select(1, self.minor_rows)

    def overwrite(self, outputs: tuple[torch.Tensor, ...], minor: tuple[torch.Tensor, ...]) -> None:
        for out, part in zip(outputs, minor):
            out.index_copy_(1, self.minor_rows, part)


UND = Routing(major_gen=False)


def visual_block_routing(length: int, device: torch.device) -> Routing:
    """[vision_start | latents | vision_end]: markers use the und expert, latents the gen expert."""
    return Routing(True, torch.tensor([0, length - 1], device=device))


class MLP(nn.Module):
    # Long video sequences (~50k tokens) would hold several [tokens, 11008] intermediates at once; chunking the
    # token axis bounds that peak without changing the result.
    CHUNK_TOKENS = 8192

    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        self.gate_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = ops.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] <= self.CHUNK_TOKENS:
            return self._mlp(x)
        rows = max(1, self.CHUNK_TOKENS // x.shape[0])
        return torch.cat([self._mlp(part) for part in x.split(rows, dim=1)], dim=1)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # inference: in place on the fresh projection outputs, two [tokens, intermediate] buffers fewer to
        # allocate (and page-fault) per call; the same values
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for suffix in ("", GEN):
            setattr(self, "q_proj" + suffix, ops.Linear(h, q_out, bias=True))
            setattr(self, "k_proj" + suffix, ops.Linear(h, kv_out, bias=True))
            setattr(self, "v_proj" + suffix, ops.Linear(h, kv_out, bias=True))
            setattr(self, "o_proj" + suffix, ops.Linear(q_out, h, bias=False))
            setattr(self, "q_norm" + suffix, norm_layer(ops, cfg.head_dim, cfg.rms_norm_eps))
            setattr(self, "k_norm" + suffix, norm_layer(ops, cfg.head_dim, cfg.rms_norm_eps))
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def expert(self, gen: bool) -> dict[str, nn.Module]:
        suffix = GEN if gen else ""
        return {name: getattr(self, name + suffix) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}

    def qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, H] (normed) -> q [B, L, Hq, D], k/v [B, L, Hkv, D] with per-head QK-norm."""
        e, (b, n, _) = self.expert(gen), x.shape
        q = e["q_norm"](e["q_proj"](x).view(b, n, self.num_heads, self.head_dim))
        k = e["k_norm"](e["k_proj"](x).view(b, n, self.num_kv_heads, self.head_dim))
        v = e["v_proj"](x).view(b, n, self.num_kv_heads, self.head_dim)
        return q, k, v


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, ops, index: int = 0):
        super().__init__()
        self.index = index   # which KV-cache layer its attention reads and writes
        self.self_attn = MoTAttention(cfg, ops)
        self.mlp = MLP(cfg, ops)
        self.mlp_moe_gen = MLP(cfg, ops)
        self.input_layernorm = norm_layer(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = norm_layer(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = norm_layer(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = norm_layer(ops, cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, routing: Routing, attend) -> torch.Tensor:
        minor_x = routing.gather(x)
        q, k, v = self._qkv(x, routing.major_gen)
        if minor_x is not None:
            routing.overwrite((q, k, v), self._qkv(minor_x, not routing.major_gen))
        q, k = rotate_qk(rope, q, k)
        out = attend(self.index, q, k, v)    # [B, L, Hq * D]
        y = self._finish(x, out, routing.major_gen)
        if minor_x is not None:
            routing.overwrite((y,), (self._finish(minor_x, routing.gather(out), not routing.major_gen),))
        return y

    def expert_modules(self, gen: bool) -> list[nn.Module]:
        """Every module of one expert in this layer: attention projections and QK norms, MLP, both layer norms
        (what weight streaming moves and the VRAM plan sizes)."""
        suffix = GEN if gen else ""
        return [*self.self_attn.expert(gen).values(), getattr(self, "mlp" + suffix),
                getattr(self, "input_layernorm" + suffix), getattr(self, "post_attention_layernorm" + suffix)]

    def _qkv(self, x: torch.Tensor, gen: bool):
        norm = self.input_layernorm_moe_gen if gen else self.input_layernorm
        return self.self_attn.qkv(norm(x), gen)

    def _finish(self, residual: torch.Tensor, attn: torch.Tensor, gen: bool) -> torch.Tensor:
        x = residual + self.self_attn.expert(gen)["o_proj"](attn)
        norm = self.post_attention_layernorm_moe_gen if gen else self.post_attention_layernorm
        mlp = self.mlp_moe_gen if gen else self.mlp
        return x + mlp(norm(x))


def rotate_qk(rope: Rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both rotated in one pass over their heads side by side."""
    both = rope.rotate(torch.cat([q, k], dim=2))
    return both.split([q.shape[2], k.shape[2]], dim=2)


@dataclass(frozen=True)
class CacheSlot:
    """Where one group of batch rows keeps this block's keys/values: cache rows `rows`, positions from `start`.
    Rows with different prefix lengths (the CFG branches) form separate groups, so each group attends to exactly
    its own keys with no padding mask (and fast SDPA/flash kernels stay usable)."""

    rows: slice
    start: int


@dataclass
class BlockLayout:
    """Where a block of `length` tokens goes for some cache slots: per layer, per slot, the (keys, values) views of
    the slot's cache rows up to the block's end (what it attends to), and (rows [R, 1], positions [R, L]) where its
    keys/values are stored. A caller that runs the same layout every denoising step makes it once."""

    reads: list
    index: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, cache: KVCache, slots: list[CacheSlot], length: int) -> "BlockLayout":
        device = cache.kv[0].device
        rows = torch.cat([torch.arange(s.rows.start, s.rows.stop, device=device) for s in slots])
        starts = torch.cat([torch.full((s.rows.stop - s.rows.start,), s.start, device=device) for s in slots])
        index = rows.view(-1, 1), starts.view(-1, 1) + torch.arange(length, device=device)
        reads = [[cache.read(layer, s.start + length, s.rows) for s in slots] for layer in range(len(cache.kv))]
        return cls(reads, index)


class BlockAttention:
    """Binds one block's cache slots, so a layer passes only its index and q, k, v ([B, L, heads, D]). The block's
    keys/values of every slot are stored with one indexed store per layer; each slot then attends to its own rows of
    the cache up to there. `compiled`: stored through each slot's views instead (the compiled step's only cache
    inputs are then those views, whose length it takes as symbolic; the copies fuse there)."""

    def __init__(self, backend: Attention, cache: KVCache | None, layout: BlockLayout | None, causal: bool,
                 compiled: bool = False):
        self.backend, self.cache, self.layout, self.causal, self.compiled = backend, cache, layout, causal, compiled

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n = q.shape[:2]
        qt = q.transpose(1, 2)
        if self.layout is None:
            out = self.backend(qt, k.transpose(1, 2), v.transpose(1, 2), causal_bottom_right=self.causal)
            return out.transpose(1, 2).reshape(b, n, -1)
        if not self.compiled:
            self.cache.store(layer, self.layout.index, k, v)
        outputs, first = [], 0
        for keys, values in self.layout.reads[layer]:
            rows = keys.shape[0]
            block = slice(first, first + rows)
            if self.compiled:   # the block's positions are the views' last n
                keys[:, :, -n:] = k[block].transpose(1, 2)
                values[:, :, -n:] = v[block].transpose(1, 2)
            part = qt if rows == b else qt[block]
            outputs.append(self.backend(part, keys, values, causal_bottom_right=self.causal))
            first += rows
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return out.transpose(1, 2).reshape(b, n, -1)


def mark_key_lengths_dynamic(layout: BlockLayout | None) -> None:
    """The compiled step's cache views (BlockLayout.reads) are as long as their slot's prefix plus the block:
    symbolic for torch.compile, so one compilation serves every prompt of a layout. A marked dimension is not
    duck-shaped either (two slots of equal length in the first step are not assumed equal afterwards); only lengths
    0 and 1 would be specialized, and a key length is at least the block's."""
    for keys, values in (pair for per_slot in (layout.reads if layout else ()) for pair in per_slot):
        torch._dynamo.mark_dynamic(keys, 2)
        torch._dynamo.mark_dynamic(values, 2)


class QwenMoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, ops, index) for index in range(cfg.num_layers))
        self.norm = norm_layer(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = norm_layer(ops, cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        self.model = QwenMoTModel(cfg, ops)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int, ops):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ops.Linear(freq_dim, hidden, bias=True), nn.SiLU(), ops.Linear(hidden, hidden, bias=True))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(dtype))


class LanceLLM(nn.Module):
    """Everything in `model.safetensors` except the ViT: the MoT LLM plus the latent in/out heads."""

    def __init__(self, cfg: LLMConfig, ops=TorchOps, attention: Attention | None = None):
        super().__init__()
        self.config = cfg
        c = cfg.constants
        self.language_model = LanguageModel(cfg, ops)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size, c.timestep_embed_dim, ops)
        self.vae2llm = ops.Linear(c.latent_channels, cfg.hidden_size, bias=True)
        self.llm2vae = ops.Linear(cfg.hidden_size, c.latent_channels, bias=True)
        self.rotary = MultimodalRotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.attention = attention or Attention("sdpa")
        self.execution_device: torch.device | None = None
        self._step_layers = None   # the decoder stack of denoising steps, compiled (compile_steps)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where activations and the KV cache live: the execution device when a host set one (under ComfyUI's
        low-VRAM loading some weights stay in RAM and are cast over per layer), else where the weights are."""
        return self.execution_device or self.vae2llm.weight.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A cache for `capacity` positions, plus one spare: then no slot's read view spans a whole cache row,
        and a compiled step sees the same view layout for every prompt (a view as long as the capacity would look
        contiguous to torch.compile, which then ties its strides to its length and recompiles when they part)."""
        cfg = self.config
        return KVCache(cfg.num_layers, batch, cfg.num_kv_heads, capacity + 1, cfg.head_dim, self.dtype, self.device)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        embeds = self.language_model.model.embed_tokens(ids if ids.device == self.device else ids.to(self.device))
        return embeds if embeds.dtype == self.dtype else embeds.to(self.dtype)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """[n] flow times -> [n, H] time embeddings in the model dtype."""
        return self.time_embedder(t.to(self.device), self.dtype)

    def embed_latents(self, latents: torch.Tensor, t_emb: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """latents [..., N, C], time embeddings broadcastable to [..., N, H], pos_embed [N, H] (on the device, in
        the model dtype) -> [..., N, H]."""
        return self.vae2llm(latents.to(self.device, self.dtype)) + t_emb + pos_embed

    def rope(self, positions: torch.Tensor) -> Rope:
        """Rotary tables for positions [B, 3, L]."""
        return Rope.of(*self.rotary(positions.to(self.device)))

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | Rope, routing: Routing, *,
                cache: KVCache | None = None, start: int = 0, causal: bool = True, rows: slice = slice(None),
                slots: list[CacheSlot] | None = None, final_norm: bool = True, layout: BlockLayout | None = None,
                step: bool = False) -> torch.Tensor:
        """Run one block. hidden [B, L, H], positions [B, 3, L] (or their Rope, when a caller keeps it across
        calls). With a cache, the block's keys/values are written at [start, start + L) of cache `rows` and
        attention reads the cache up to there; `slots` gives several such (rows, start) groups, in batch order
        (and `layout` where they go, BlockLayout.of, when the caller keeps it). `step`: a denoising step (the same
        shapes every call, with its `layout`), run compiled when compile_steps() was called.
        Returns the hidden states, final-normed (und rows: model.norm, gen rows: model.norm_moe_gen) unless
        `final_norm` is False."""
        rope = positions if isinstance(positions, Rope) else self.rope(positions)
        if cache is not None and slots is None:
            first, stop, _ = rows.indices(cache.batch)
            slots = [CacheSlot(slice(first, stop), start)]
        if cache is not None and max(s.start for s in slots) + hidden.shape[1] > cache.capacity:
            raise RuntimeError(f"KV cache overflow: a block of {hidden.shape[1]} tokens from position "
                               f"{max(s.start for s in slots)} does not fit the capacity {cache.capacity}")
        if cache is not None and layout is None:
            layout = BlockLayout.of(cache, slots, hidden.shape[1])
        compiled = step and self.compiles_steps
        attend = BlockAttention(self.attention, cache, layout, causal, compiled)
        if compiled:
            return self._compiled_step(hidden, rope, routing, attend, final_norm)
        return self.run_layers(hidden, rope, routing, attend, final_norm)

    def compile_steps(self) -> None:
        """Denoising steps run the decoder stack through torch.compile: one compilation per request layout
        (resolution and CFG rows) whatever the prompts' lengths, then norms, rotary, SiLU-mul and residual adds
        fuse. Where compilation is unavailable the first step says so once and everything runs eagerly.
        The compiled function is the class's (a compiled bound method would make the LLM hold itself, and a
        dropped pipeline would keep its weights until a full garbage collection)."""
        self._step_layers = torch.compile(LanceLLM.run_layers, dynamic=False)
        self._step_checked = False

    @property
    def compiles_steps(self) -> bool:
        """Denoising steps run compiled (their layers without hooks: see run_layers)."""
        return self._step_layers is not None

    def _compiled_step(self, hidden, rope, routing, attend, final_norm) -> torch.Tensor:
        mark_key_lengths_dynamic(attend.layout)
        if self._step_checked:
            return self._run_compiled(hidden, rope, routing, attend, final_norm)
        try:
            out = self._run_compiled(hidden, rope, routing, attend, final_norm)
        except (torch.OutOfMemoryError, Cancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to the eager step, once
            log.warning("torch.compile is unavailable here (%s: %s): denoising steps run eagerly",
                        type(exc).__name__, first_line(exc))
            self._step_layers = None
            return self.run_layers(hidden, rope, routing, attend, final_norm)
        self._step_checked = True
        return out

    def _run_compiled(self, hidden, rope, routing, attend, final_norm) -> torch.Tensor:
        return self._step_layers(self, hidden, rope, routing, attend, final_norm, hooks=False)

    def run_layers(self, hidden: torch.Tensor, rope: Rope, routing: Routing, attend,
                   final_norm: bool = True, hooks: bool = True) -> torch.Tensor:
        """The decoder stack with a given attention binding (`attend(layer_index, q, k, v)`). `hooks=False` (the
        compiled step) calls each layer's forward directly: a call's hooks (cancel polls, session.py) must neither
        be traced into the graph nor make it recompile; the LLM's own pre-hook polls around the compiled stack."""
        x = hidden
        for layer in self.language_model.model.layers:
            x = layer(x, rope, routing, attend) if hooks else layer.forward(x, rope, routing, attend)
        return self.final_norm(x, routing) if final_norm else x

    def final_norm(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        model = self.language_model.model
        minor = routing.gather(x)
        y = (model.norm_moe_gen if routing.major_gen else model.norm)(x)
        if minor is not None:
            routing.overwrite((y,), ((model.norm if routing.major_gen else model.norm_moe_gen)(minor),))
        return y

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.language_model.lm_head(hidden)
        return out if out.dtype == torch.float32 else out.float()

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (final-normed by the generation expert) -> velocities in fp32."""
        out = self.llm2vae(hidden)
        return out if out.dtype == torch.float32 else out.float()


def prefill_splits(llm: LanceLLM, embeds: torch.Tensor, positions: torch.Tensor, splits: list, gen_mask: torch.Tensor,
                   cache: KVCache, row: int = 0) -> torch.Tensor:
    """Fill one cache row split by split: causal text sees the cache and earlier tokens, visual blocks are
    bidirectional. `embeds` [L, H] / `positions` [3, L] hold exactly these splits, in order (a CFG branch may skip
    some); `gen_mask` is indexed by each split's own start/end. Consecutive causal splits run as one causal block
    (one pass over the weights instead of one per split), cut into chunks of at most PREFILL_CHUNK_TOKENS (the
    same attention: a chunk sees the cache and itself causally; a long prompt then needs a small mask and is
    cancellable between chunks). Returns the last block's hidden states."""
    offset, hidden = 0, None
    for group in _attention_runs(splits):
        causal = group[0].mode == "causal"
        experts = torch.cat([gen_mask[split.start:split.end] for split in group])
        length = len(experts)
        step = PREFILL_CHUNK_TOKENS if causal else length
        for first in range(0, length, step):
            part = slice(offset + first, offset + min(first + step, length))
            hidden = llm(embeds[part].unsqueeze(0), positions[:, part].unsqueeze(0),
                         Routing.of(experts[first:first + step], llm.device), cache=cache, start=part.start,
                         causal=causal, rows=slice(row, row + 1))
        offset += length
    return hidden


def _attention_runs(splits: list) -> list[list]:
    """Splits grouped so that each group is one block: runs of causal splits, every other split alone."""
    groups: list[list] = []
    for split in splits:
        if groups and split.mode == "causal" and groups[-1][-1].mode == "causal":
            groups[-1].append(split)
        else:
            groups.append([split])
    return groups
