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

from ..errors import InputError
from ..nn.config import LLMConfig
from ..nn.kv_cache import KVCache
from ..nn.llm import BlockLayout, CacheSlot, LanceLLM, Routing, prefill_splits, visual_block_routing
from ..nn.positions import Rope, latent_position_embedding
from ..runtime.prefix_store import PrefixStore
from .packing import CAPTION_CODES, MEDIA_CODES, drop_codes, has_media
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
        clean = llm.time_embedding(torch.zeros(1))                          # condition latents are at t = 0
        pos_embed = latent_pos_embed(llm.config, grid).to(llm.device, llm.dtype)
        embeds[block.payload] = llm.embed_latents(latent, clean, pos_embed)
    return embeds


class TargetBlock:
    """The per-step query of one request: [vision_start | latent tokens | vision_end]."""

    def __init__(self, llm: LanceLLM, inputs: GenerationInputs, prefix_embeds: torch.Tensor):
        split = inputs.seq.target_split
        self.markers = prefix_embeds[[split.start, split.end - 1]].unsqueeze(1)         # [2, 1, H]
        self.pos_embed = latent_pos_embed(llm.config, inputs.target).to(llm.device, llm.dtype)
        self.routing: Routing = visual_block_routing(split.length, llm.device)
        frozen = torch.zeros(inputs.target.tokens, 1, dtype=torch.bool)
        frozen[:inputs.frozen_tokens] = True                                             # i2v: frame 0 stays at t = 0
        self.frozen = frozen.to(llm.device) if inputs.frozen_tokens else None
        self._marker_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def query(self, llm: LanceLLM, x: torch.Tensor, t_emb: torch.Tensor, t0_emb: torch.Tensor | None) -> torch.Tensor:
        """x [R, N, C] latents, t_emb [R or 1, 1, H] their time embedding (t0_emb [1, 1, H]: t = 0, for frozen
        tokens) -> query embeddings [R, N + 2, H]."""
        if self.frozen is not None:
            t_emb = torch.where(self.frozen, t0_emb, t_emb)
        start, end = self._markers(x.shape[0])
        return torch.cat([start, llm.embed_latents(x, t_emb, self.pos_embed), end], dim=1)

    def _markers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows not in self._marker_rows:
            self._marker_rows[rows] = (self.markers[0:1].expand(rows, 1, -1), self.markers[1:2].expand(rows, 1, -1))
        return self._marker_rows[rows]


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
        self._ropes: dict[tuple, Rope] = {}                     # the query's rotary tables per slot layout
        self._layouts: dict[tuple, BlockLayout] = {}            # where the query goes, per slot layout
        self._times: dict[float, torch.Tensor] = {}             # time embeddings [1, 1, H] per timestep

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
        self.branches, self.slots, self.rows, self._ropes, self._layouts = {}, {}, rows, {}, {}
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
    def prepare_times(self, timesteps: list[float]) -> None:
        """Time embeddings of a whole schedule before its first step (a step then looks its own up)."""
        for t in timesteps + [0.0]:
            self._time(t)

    def _time(self, t: float) -> torch.Tensor:
        """[1, 1, H] embedding of one timestep, each computed alone (the same numbers whoever asks first)."""
        if t not in self._times:
            self._times[t] = self.llm.time_embedding(torch.tensor([t], dtype=torch.float32)).view(1, 1, -1)
        return self._times[t]

    def velocities(self, chunks: list[tuple[Branch, torch.Tensor, float | torch.Tensor]],
                   batched: bool | None = None) -> list[torch.Tensor]:
        """chunks: (branch, x [rows, N, C] target latents, t: one timestep for every row (a float) or one per
        row ([rows] tensor)), all with the same row count. Returns each chunk's velocity [rows, N, C] (fp32).
        Chunks run in branch order, in one batched forward when `batched` (None: auto, by size), else one
        forward per branch."""
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
        """One query per chunk; chunks with the same latents and timesteps share one embedding, so the results do
        not depend on how a host splits or repeats its rows."""
        queries, seen = [], []
        for branch, x, t in chunks:
            for sx, st, query in seen:
                if _same(sx, x) and _same(st, t):
                    break
            else:
                query = self.block(branch.inputs).query(self.llm, x, self._time_embedding(t), self._time(0.0))
                seen.append((x, t, query))
            queries.append(query)
        return queries

    def _time_embedding(self, t: float | torch.Tensor) -> torch.Tensor:
        """[1, 1, H] for one timestep of every row, [rows, 1, H] for a host's per-row timesteps."""
        if not isinstance(t, torch.Tensor):
            return self._time(t)
        values = t.detach().float().tolist()
        if len(set(values)) == 1:
            return self._time(values[0])
        return torch.cat([self._time(v) for v in values])

    def _forward(self, block: TargetBlock, query: torch.Tensor, slots: list[BranchSlot]) -> torch.Tensor:
        """One forward of `query` [rows, L, H], laid out slot after slot, against the cache. -> [rows, N, C] fp32."""
        cache_slots = [CacheSlot(s.rows, s.length) for s in slots]
        key = tuple(id(s) for s in slots)
        if key not in self._layouts:
            self._layouts[key] = BlockLayout.of(self.cache, cache_slots, query.shape[1])
        hidden = self.llm(query, self._rope(slots), block.routing, cache=self.cache, causal=False, slots=cache_slots,
                          final_norm=False, layout=self._layouts[key], step=True)
        latents = self.llm.language_model.model.norm_moe_gen(hidden[:, 1:-1])   # the markers' outputs are unused
        return self.llm.velocity(latents)

    def _rope(self, slots: list[BranchSlot]) -> Rope:
        key = tuple(id(s) for s in slots)
        if key not in self._ropes:
            positions = torch.cat([s.query_pos.expand(s.row_count(), -1, -1) for s in slots])
            self._ropes[key] = self.llm.rope(positions)
        return self._ropes[key]


def _same(a, b) -> bool:
    """The same latents or timesteps (one object, equal floats, or equal tensors)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


def with_first_frame(inputs: GenerationInputs, x: torch.Tensor) -> torch.Tensor:
    """i2v: the frozen frame-0 rows are the request's exact clean latent (whatever a host's round trip made of
    them)."""
    frozen = inputs.frozen_tokens
    if not frozen:
        return x
    x = x.clone()
    x[:, :frozen] = inputs.first_frame.to(x)
    return x
