"""The CFG-branch engine: one implementation of "prefill each branch's prefix once, then run the target block
against it every step", used by the library sampler (sampler.py) and a host's own sampler (velocity.py).

Branches: cond (the whole prefix), uncond (the caption dropped, or a negative prompt in its place) and, with
image CFG, image-uncond (the uncond prefix without the ViT/source media blocks). Each branch's prefix is
prefilled once into its rows of one KV cache (branch order, one row per sample), or restored from the
PrefixStore when an earlier run prefilled the same prefix with the same weights. A step runs only the target
block `[vision_start | latents | vision_end]`: projections and MLPs batched over all rows, attention once per
branch over exactly that branch's keys (no padding mask).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .config import LLMConfig
from .errors import InputError
from .kv_cache import KVCache
from .llm import CacheSlot, LanceLLM, prefill_splits, query_segments
from .packing import CAPTION_CODES, MEDIA_CODES, drop_codes, has_media
from .positions import latent_position_embedding
from .prefix_store import PrefixStore
from .request import GenerationInputs, LatentGrid

BRANCH_ORDER = ("cond", "uncond", "image_uncond")   # row order of the branches in the cache
# Auto CFG batching: one forward for all branches up to this many query tokens per branch. Measured on an H100
# (bf16, release width): 768^2 image 99-114 ms batched vs 152-272 ms sequential per step; 848x480x61 video (45k
# tokens) 271 ms batched vs 226 ms sequential, where the step is compute-bound and batching only adds traffic.
BATCHED_CFG_MAX_TOKENS = 16384


@dataclass(frozen=True, eq=False)
class Branch:
    """One CFG branch of a request: its prefix is `inputs.seq`'s without the tokens of the `dropped` codes,
    positioned per `positions` (reference_kv: the cond positions; contiguous: as if the dropped tokens never
    were there). `kind` (one of BRANCH_ORDER) places its rows in the cache."""

    inputs: GenerationInputs
    kind: str = "cond"
    dropped: tuple[int, ...] = ()
    positions: str = "reference_kv"

    @property
    def key(self) -> tuple:
        return (id(self.inputs), self.dropped, self.positions)

    @property
    def rank(self) -> int:
        return BRANCH_ORDER.index(self.kind)


def cfg_branches(inputs: GenerationInputs, count: int | None = None,
                 uncond_positions: str = "reference_kv") -> list[Branch]:
    """The first `count` of [cond, uncond, image-uncond] (None: all the request has; image-uncond only with
    media). A negative prompt is the uncond prefix (nothing dropped); image-uncond is the uncond prefix without
    its media, positioned as if they never were there (kept positions would leave gaps sized by the media and the
    caption, which this branch must not see)."""
    if count is None:
        count = 3 if has_media(inputs.seq) else 2
    if count == 3 and not has_media(inputs.seq):
        raise InputError("image_cfg_scale: this request has no image or video input to guide by (image CFG is "
                         "for edits); set it to 1")
    if inputs.negative_seq is not None:
        uncond = Branch(replace(inputs, seq=inputs.negative_seq), "uncond")
    else:
        uncond = Branch(inputs, "uncond", CAPTION_CODES, uncond_positions)
    image_uncond = Branch(uncond.inputs, "image_uncond", uncond.dropped + MEDIA_CODES, "contiguous")
    return [Branch(inputs), uncond, image_uncond][:count]


def latent_pos_embed(cfg: LLMConfig, grid: LatentGrid) -> torch.Tensor:
    c = cfg.constants
    if grid.frames > c.max_latent_frames:
        raise InputError(f"{grid.frames} latent frames exceed the model's maximum of {c.max_latent_frames} "
                         f"({c.max_num_frames} video frames)")
    return latent_position_embedding(grid.frames, grid.height, grid.width, cfg.hidden_size, c.max_latent_size)


def prefix_embeddings(llm: LanceLLM, inputs: GenerationInputs) -> torch.Tensor:
    """[L, H] input embeddings of a request's sequence: text rows from the embedding table, ViT payloads from
    the ViT, source payloads as clean latent tokens (t = 0). The target payload rows are left as text rows."""
    seq = inputs.seq
    embeds = llm.embed_text(seq.ids).clone()
    for block, vit in zip(seq.blocks_with_role("vit"), inputs.vit_embeds):
        embeds[block.payload] = vit.to(embeds)
    for block, latent in zip(seq.blocks_with_role("source"), inputs.source_latents):
        t, h2, w2 = block.rope_grid
        grid = LatentGrid(t, h2 // 2, w2 // 2)
        if grid.tokens != latent.shape[0]:
            raise InputError(f"condition latent has {latent.shape[0]} tokens, its block expects {grid.tokens}")
        embeds[block.payload] = llm.embed_latents(latent, torch.zeros(latent.shape[0]), latent_pos_embed(llm.config, grid))
    return embeds


class TargetBlock:
    """The per-step query of one request: [vision_start | latent tokens | vision_end]."""

    def __init__(self, llm: LanceLLM, inputs: GenerationInputs, prefix_embeds: torch.Tensor):
        split = inputs.seq.target_split
        self.marker_embeds = prefix_embeds[[split.start, split.end - 1]]
        self.pos_embed = latent_pos_embed(llm.config, inputs.target)
        self.segments = query_segments(split.length)

    def query(self, llm: LanceLLM, x: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] latents, t_tokens [B, N] per-token timesteps -> query embeddings [B, N + 2, H]."""
        latent = llm.embed_latents(x, t_tokens, self.pos_embed)
        markers = self.marker_embeds.to(latent.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([markers[:, :1], latent, markers[:, 1:]], dim=1)


@dataclass(frozen=True)
class BranchSlot:
    """Where one branch's prefix sits in the cache: its rows, its prefix length, and the positions of the target
    block's query [3, target block length] for that branch."""

    rows: slice
    length: int
    query_pos: torch.Tensor

    def row_count(self) -> int:
        return self.rows.stop - self.rows.start


def prefill_branch(llm: LanceLLM, branch: Branch, embeds: torch.Tensor, cache: KVCache, row: int) -> BranchSlot:
    """Prefill one branch's prefix into cache row `row`; returns its one-row slot."""
    seq = branch.inputs.seq
    pos, target = seq.positions, seq.target_split
    prefix_len = target.start
    if not branch.dropped:
        prefix_splits = [s for s in seq.splits if s.end <= prefix_len]
        prefill_splits(llm, embeds[:prefix_len], pos, prefix_splits, seq.gen_mask, cache, row=row)
        return BranchSlot(slice(row, row + 1), prefix_len, pos[:, target.start:target.end])
    keep, short_pos = drop_codes(seq, llm.config, branch.dropped)
    kept_prefix = keep[keep < prefix_len]
    prefix_pos = pos[:, kept_prefix] if branch.positions == "reference_kv" else short_pos[:, :len(kept_prefix)]
    kept_splits = [s for s in seq.splits if s.end <= prefix_len and s.code not in branch.dropped]  # reference rule
    prefill_splits(llm, embeds[kept_prefix], prefix_pos, kept_splits, seq.gen_mask, cache, row=row)
    length = len(kept_prefix)
    return BranchSlot(slice(row, row + 1), length, short_pos[:, length:length + target.length])


def batched_cfg_fits(rows: int, query_len: int) -> bool:
    return rows * query_len <= BATCHED_CFG_MAX_TOKENS


class BranchEngine:
    """The prefilled prefixes of the branches a sampler asks for, in one KV cache, and the target block's forward
    against them. `store` (optional) keeps prefixes across runs, keyed with `weights_version()` (a host's
    weight patches)."""

    def __init__(self, llm: LanceLLM, store: PrefixStore | None = None,
                 weights_version: Callable[[], object] = lambda: None):
        self.llm, self.store, self.weights_version = llm, store, weights_version
        self.reset()

    def reset(self) -> None:
        """Forget the cache (a host calls this when its weights or requests may change)."""
        self.prefills = 0   # prefixes prefilled since the reset (not restored from the store), for diagnostics
        self.cache: KVCache | None = None
        self.rows = 0
        self.branches: dict[tuple, Branch] = {}     # in cache order; keeps the requests alive while id() keys them
        self.slots: dict[tuple, BranchSlot] = {}
        self._per_request: dict[int, tuple[GenerationInputs, torch.Tensor, TargetBlock]] = {}

    @property
    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    # -- prefixes ---------------------------------------------------------------------------------------
    def ensure(self, branches: list[Branch], rows: int) -> None:
        """Every branch's prefix in the cache, `rows` rows each (one per sample). A branch not seen yet (or
        another row count) rebuilds the cache with every branch known so far."""
        if self.cache is not None and rows == self.rows and all(b.key in self.slots for b in branches):
            return
        known = list(self.branches.values()) if rows == self.rows else []
        wanted = sorted({b.key: b for b in known + branches}.values(), key=lambda b: b.rank)
        capacity = max(b.inputs.seq.target_split.end for b in wanted)
        self.cache = self.llm.new_cache(rows * len(wanted), capacity)
        self.branches, self.slots, self.rows = {}, {}, rows
        keys = self._store_keys(wanted)
        for index, (branch, key) in enumerate(zip(wanted, keys)):
            row = index * rows
            slot = self._restore_or_prefill(branch, key, row)
            self.cache.copy_rows(row, range(row + 1, row + rows), slot.length)
            self.branches[branch.key] = branch
            self.slots[branch.key] = BranchSlot(slice(row, row + rows), slot.length, slot.query_pos)

    def _store_keys(self, branches: list[Branch]) -> list[str | None]:
        if self.store is None:
            return [None] * len(branches)
        context = (str(self.llm.dtype), self.weights_version())
        keys = PrefixStore.keys([(b.inputs.seq, self.embeddings(b.inputs), b.dropped, b.positions) for b in branches],
                                context)
        self.store.begin(keys)
        return keys

    def _restore_or_prefill(self, branch: Branch, key: str | None, row: int):
        stored = self.store.restore(key, self.cache, row) if key is not None else None
        if stored is not None:
            return stored
        slot = prefill_branch(self.llm, branch, self.embeddings(branch.inputs), self.cache, row)
        self.prefills += 1
        if key is not None:
            self.store.save(key, self.cache, row, slot.length, slot.query_pos)
        return slot

    def embeddings(self, inputs: GenerationInputs) -> torch.Tensor:
        return self._request(inputs)[1]

    def block(self, inputs: GenerationInputs) -> TargetBlock:
        return self._request(inputs)[2]

    def _request(self, inputs: GenerationInputs):
        """(inputs, prefix embeddings, target block), computed once per request object."""
        entry = self._per_request.get(id(inputs))
        if entry is None or entry[0] is not inputs:
            embeds = prefix_embeddings(self.llm, inputs)
            entry = (inputs, embeds, TargetBlock(self.llm, inputs, embeds))
            self._per_request[id(inputs)] = entry
        return entry

    # -- steps ------------------------------------------------------------------------------------------
    def velocities(self, chunks: list[tuple[Branch, torch.Tensor, torch.Tensor]],
                   batched: bool | None = None) -> list[torch.Tensor]:
        """chunks: (branch, x [rows, N, C] target latents, t [rows] timesteps), all with the same row count.
        Returns each chunk's velocity [rows, N, C] (fp32). Chunks run in branch order, in one batched forward
        when `batched` (None: auto, by size), else one forward per branch."""
        order = sorted(range(len(chunks)), key=lambda i: chunks[i][0].rank)
        ordered = [chunks[i] for i in order]
        rows = ordered[0][1].shape[0]
        self.ensure([branch for branch, _, _ in ordered], rows)
        queries = self._queries(ordered)
        slots = [self.slots[branch.key] for branch, _, _ in ordered]
        if batched is None:
            batched = batched_cfg_fits(rows, queries[0].shape[1])
        block = self.block(ordered[0][0].inputs)
        if batched or len(slots) == 1:
            parts = self._forward(block, torch.cat(queries) if len(queries) > 1 else queries[0], slots).split(rows)
        else:
            parts = [self._forward(block, query, [slot]) for query, slot in zip(queries, slots)]
        out: list = [None] * len(chunks)
        for position, index in enumerate(order):
            out[index] = parts[position]
        return out

    def _queries(self, chunks) -> list[torch.Tensor]:
        """One query per chunk; chunks with equal latents and timesteps share one embedding, so the results do not
        depend on how a host splits or repeats its rows."""
        queries, seen = [], []
        for branch, x, t in chunks:
            x, t_tokens = frozen_first_frame(branch.inputs, x, t)
            for sx, st, query in seen:
                if torch.equal(sx, x) and torch.equal(st, t_tokens):
                    break
            else:
                query = self.block(branch.inputs).query(self.llm, x, t_tokens)
                seen.append((x, t_tokens, query))
            queries.append(query)
        return queries

    def _forward(self, block: TargetBlock, query: torch.Tensor, slots: list[BranchSlot]) -> torch.Tensor:
        """One forward of `query` [rows, L, H], laid out slot after slot, against the cache. -> [rows, N, C] fp32."""
        pos = torch.cat([s.query_pos.expand(s.row_count(), -1, -1) for s in slots])
        out = self.llm(query, pos, block.segments, cache=self.cache, causal=False,
                       slots=[CacheSlot(s.rows, s.length) for s in slots])
        return self.llm.velocity(out[:, 1:-1])


def frozen_first_frame(inputs: GenerationInputs, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """i2v: the frozen frame-0 rows are the request's exact clean latent at t = 0 (whatever a host's round trip
    made of them). -> (x [B, N, C], per-token timesteps [B, N] fp32 on the CPU)."""
    t_tokens = t.detach().to("cpu", torch.float32).view(-1, 1).expand(-1, x.shape[1]).clone()
    frozen = inputs.frozen_tokens
    if frozen:
        x = x.clone()
        x[:, :frozen] = inputs.first_frame.to(x)
        t_tokens[:, :frozen] = 0.0
    return x, t_tokens
