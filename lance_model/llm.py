"""The Lance MoT language model: a Qwen2.5 decoder whose every per-layer weight exists twice (understanding
expert and `_moe_gen` generation expert). Attention is shared: all tokens attend jointly, only the projections,
norms and MLPs are chosen per token. Module names mirror the release checkpoint so weights map by key name.

A forward pass processes one *block* of tokens against a KV cache:
  * `causal=True`  - text; each token sees the cache and earlier tokens of the block,
  * `causal=False` - a visual block; bidirectional over the cache and the whole block.
Expert routing is a list of contiguous `Segment`s (VS und | payload gen | VE und), so experts are applied to
slices rather than gathered/scattered token by token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import LLMConfig
from .kv_cache import KVCache
from .ops import TorchOps, norm_layer
from .positions import MultimodalRotary, apply_rotary, timestep_sinusoid

GEN = "_moe_gen"
PREFILL_CHUNK_TOKENS = 2048   # causal prefill blocks are cut into chunks of this many tokens at most


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    gen: bool  # True: generation expert (latent payload), False: understanding expert


def segments_from_mask(gen_mask: torch.Tensor) -> list[Segment]:
    """Contiguous runs of the per-token expert choice."""
    flags = gen_mask.tolist()
    segments, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            segments.append(Segment(start, i, bool(flags[start])))
            start = i
    return segments


def per_expert(segments: list[Segment], inputs: tuple[torch.Tensor, ...], fn) -> tuple[torch.Tensor, ...]:
    """Apply `fn(*token_slices, gen) -> tuple of [B, n, ...]` once per expert over all of that expert's segments
    (dim 1 is the token axis), and reassemble the outputs in token order. One call per expert, not per segment:
    the two marker tokens of a denoising step share one pass over the understanding expert's weights."""
    if len(segments) == 1:
        return fn(*inputs, segments[0].gen)
    pieces: list = [None] * len(segments)
    for gen in (False, True):
        chosen = [i for i, s in enumerate(segments) if s.gen == gen]
        if not chosen:
            continue
        gathered = [_cat_tokens([x[:, segments[i].start:segments[i].end] for i in chosen]) for x in inputs]
        lengths = [segments[i].end - segments[i].start for i in chosen]
        outputs = [y.split(lengths, dim=1) for y in fn(*gathered, gen)]
        for position, i in enumerate(chosen):
            pieces[i] = tuple(y[position] for y in outputs)
    return tuple(_cat_tokens(list(parts)) for parts in zip(*pieces))


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


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
        """x [B, L, H] -> q [B, L, Hq, D], k/v [B, L, Hkv, D] with per-head QK-norm."""
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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: list[Segment],
                attend: "BlockAttention") -> torch.Tensor:
        q, k, v = per_expert(segments, (x,), lambda part, gen: self.self_attn.qkv(self._norm_in(part, gen), gen))
        cos, sin = rope
        q = apply_rotary(q.transpose(1, 2).float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.transpose(1, 2).float(), cos, sin).to(x.dtype)
        out = attend(self.index, q, k, v.transpose(1, 2))  # [B, Hq, L, D]
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return per_expert(segments, (x, out), lambda residual, attn, gen: (self._finish(residual, attn, gen),))[0]

    def _norm_in(self, x: torch.Tensor, gen: bool) -> torch.Tensor:
        return (self.input_layernorm_moe_gen if gen else self.input_layernorm)(x)

    def _finish(self, residual: torch.Tensor, attn: torch.Tensor, gen: bool) -> torch.Tensor:
        x = residual + self.self_attn.expert(gen)["o_proj"](attn)
        norm = self.post_attention_layernorm_moe_gen if gen else self.post_attention_layernorm
        mlp = self.mlp_moe_gen if gen else self.mlp
        return x + mlp(norm(x))


@dataclass(frozen=True)
class CacheSlot:
    """Where one group of batch rows keeps this block's keys/values: cache rows `rows`, positions from `start`.
    Rows with different prefix lengths (the CFG branches) form separate groups, so each group attends to exactly
    its own keys with no padding mask (and fast SDPA/flash kernels stay usable)."""

    rows: slice
    start: int

    def size(self, cache: KVCache) -> int:
        return len(range(*self.rows.indices(cache.batch)))


class BlockAttention:
    """Binds one block's cache slots, so a layer passes only its index and q, k, v."""

    def __init__(self, backend: Attention, cache: KVCache | None, slots: list[CacheSlot], causal: bool):
        self.backend, self.cache, self.slots, self.causal = backend, cache, slots, causal

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self.backend(q, k, v, causal_bottom_right=self.causal)
        outputs, first = [], 0
        for slot in self.slots:
            part = slice(first, first + slot.size(self.cache))
            self.cache.write(layer, slot.start, k[part], v[part], slot.rows)
            keys, values = self.cache.read(layer, slot.start + k.shape[2], slot.rows)
            outputs.append(self.backend(q[part], keys, values, causal_bottom_right=self.causal))
            first = part.stop
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


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

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where activations and the KV cache live: the execution device when a host set one (under ComfyUI's
        low-VRAM loading some weights stay in RAM and are cast over per layer), else where the weights are."""
        return self.execution_device or self.vae2llm.weight.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, self.dtype, self.device)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids.to(self.device)).to(self.dtype)

    def embed_latents(self, latents: torch.Tensor, timesteps: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """latents [..., N, C], timesteps [..., N], pos_embed [N, H] -> [..., N, H]."""
        shape = latents.shape[:-1]
        t_emb = self.time_embedder(timesteps.reshape(-1).to(self.device), self.dtype).view(*shape, -1)
        return self.vae2llm(latents.to(self.device, self.dtype)) + t_emb + pos_embed.to(self.device, self.dtype)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, segments: list[Segment], *,
                cache: KVCache | None = None, start: int = 0, causal: bool = True, rows: slice = slice(None),
                slots: list[CacheSlot] | None = None) -> torch.Tensor:
        """Run one block. hidden [B, L, H], positions [B, 3, L]. With a cache, the block's keys/values are
        written at [start, start + L) of cache `rows` and attention reads the cache up to there; `slots` gives
        several such (rows, start) groups, in batch order. Returns the final-normed hidden states (und rows:
        model.norm, gen rows: model.norm_moe_gen)."""
        attend = BlockAttention(self.attention, cache, slots or [CacheSlot(rows, start)], causal)
        return self.run_layers(hidden, positions, segments, attend)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, segments: list[Segment], attend) -> torch.Tensor:
        """The decoder stack with a given attention binding (`attend(layer_index, q, k, v)`)."""
        model = self.language_model.model
        rope = self.rotary(positions.to(self.device))
        x = hidden
        for layer in model.layers:
            x = layer(x, rope, segments, attend)
        return per_expert(segments, (x,), lambda part, gen: ((model.norm_moe_gen if gen else model.norm)(part),))[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden).float()

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden).float()


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
                         segments_from_mask(experts[first:first + step]), cache=cache, start=part.start, causal=causal,
                         rows=slice(row, row + 1))
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


def query_segments(length: int) -> list[Segment]:
    """A target block [vision_start | latents | vision_end]: markers use the und expert, latents the gen expert."""
    return [Segment(0, 1, False), Segment(1, length - 1, True), Segment(length - 1, length, False)]

