"""Flow-matching sampler with text CFG (and optional image CFG for edits) over a prefilled KV cache.

The conditioning prefix (everything before the target block) is prefilled once per CFG branch; each step then
runs only the target block `[vision_start | latents | vision_end]` against the cache. The branches run in one
batched forward (rows [cond x B, uncond x B, image-uncond x B]): projections and MLPs are batched, attention runs
once per branch over exactly that branch's keys (no padding mask).

Branches: cond (the whole prefix), uncond (the caption dropped, or a negative prompt in its place) and, with
image CFG, image-uncond (the uncond branch without the ViT/source media blocks). The guided velocity is
v_u + g_t (v_c - v_u) with text CFG only, and v_uu + g_t (v_c - v_u) + g_v (v_u - v_uu) with image CFG, which
is the former exactly when g_v = 1 (so image CFG is off at 1 and no third branch runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .errors import Cancelled, InputError
from .kv_cache import KVCache
from .llm import CacheSlot, LanceLLM, prefill_splits, query_segments
from .packing import CAPTION_CODES, MEDIA_CODES, PackedSequence, drop_codes, has_media
from .prefix_store import PrefixStore

RENORM_TYPES = ("global", "channel", "none")
BATCHED_CFG_MAX_TOKENS = 16384
UNCOND_POSITIONS = ("reference_kv", "contiguous")


@dataclass(frozen=True)
class GuidanceOptions:
    scale: float = 4.0
    interval: tuple[float, float] = (0.4, 1.0)   # guidance applies when interval[0] < t <= interval[1]
    renorm: str = "global"
    renorm_min: float = 0.0
    # reference_kv: the uncond prefix keeps the cond positions (the official KV path); contiguous: recomputed
    uncond_positions: str = "reference_kv"
    # image CFG (edits): g_v of v_uu + g_t (v_c - v_u) + g_v (v_u - v_uu); 1 = off (the official behaviour)
    image_scale: float = 1.0

    def validate(self) -> None:
        if not self.scale >= 1.0:
            raise InputError(f"cfg_scale must be >= 1.0, got {self.scale}")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise InputError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got {self.interval}")
        if self.renorm not in RENORM_TYPES:
            raise InputError(f"cfg_renorm must be one of {RENORM_TYPES}, got {self.renorm!r}")
        if not 0.0 <= self.image_scale <= 1000.0:
            raise InputError(f"image_cfg_scale must be within [0, 1000], got {self.image_scale}")
        if self.uncond_positions not in UNCOND_POSITIONS:
            raise InputError(f"uncond_positions must be one of {UNCOND_POSITIONS}, got {self.uncond_positions!r}")

    @property
    def image_guided(self) -> bool:
        return self.image_scale != 1.0

    def active(self, t: float) -> bool:
        return (self.scale > 1.0 or self.image_guided) and self.interval[0] < t <= self.interval[1]


@dataclass(frozen=True)
class SamplerOptions:
    steps: int = 30
    shift: float = 3.5
    guidance: GuidanceOptions = field(default_factory=GuidanceOptions)
    # True / False, or None = auto: batched up to BATCHED_CFG_MAX_TOKENS query tokens. Measured on an H100 (bf16,
    # release width): 768^2 image 99-114 ms batched vs 152-272 ms sequential per step; 848x480x61 video (45k tokens)
    # 271 ms batched vs 226 ms sequential, where the step is compute-bound and batching only adds traffic.
    batched_cfg: bool | None = None
    state_dtype: torch.dtype = torch.float32   # the reference keeps the Euler state in bf16

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.shift > 0:
            raise InputError(f"shift must be > 0, got {self.shift}")
        self.guidance.validate()


@dataclass
class StepInfo:
    step: int
    total: int
    t: float
    x0: torch.Tensor                 # [B, N, C] predicted clean target latents (for previews)
    v_cond: torch.Tensor             # [B, N, C]
    v_uncond: torch.Tensor | None
    v: torch.Tensor                  # velocity used for the update (after CFG and renorm)
    v_image_uncond: torch.Tensor | None = None   # image CFG's media-dropped branch


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, v_image_uncond: torch.Tensor | None,
                    guidance: GuidanceOptions) -> torch.Tensor:
    """Text CFG, plus image CFG when the media-dropped branch ran; then the renorm against v_cond."""
    v = v_uncond + guidance.scale * (v_cond - v_uncond)
    if v_image_uncond is not None:
        v = v + (guidance.image_scale - 1.0) * (v_uncond - v_image_uncond)   # = v_uu + g_t(..) + g_v(v_u - v_uu)
    return renormalize(v, v_cond, guidance.renorm, guidance.renorm_min)


def flow_timesteps(steps: int, shift: float) -> torch.Tensor:
    """Shifted schedule t_i = s*u / (1 + (s-1)*u) over u = linspace(1, 0, steps+1) (fp32 as the reference)."""
    u = torch.linspace(1, 0, steps + 1)
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class TargetState:
    """The latents being denoised: x [B, N, C]; `frozen` rows (i2v frame 0) stay clean at t = 0."""

    x: torch.Tensor
    frozen: int = 0


def renormalize(v: torch.Tensor, v_cond: torch.Tensor, kind: str, minimum: float) -> torch.Tensor:
    """Scale the guided velocity so its norm does not exceed the conditional one (per sample / per token)."""
    if kind == "none":
        return v
    dims = (1, 2) if kind == "global" else (2,)
    scale = (v_cond.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + 1e-8)).clamp(min=minimum, max=1.0)
    return v * scale


@dataclass(frozen=True)
class BranchSlot:
    """Where one CFG branch's prefix sits in a KV cache: its cache rows, its prefix length, and the positions of
    the target block's query [3, target block length] for that branch."""

    rows: slice
    length: int
    query_pos: torch.Tensor

    def rows_in(self, cache: KVCache) -> int:
        return len(range(*self.rows.indices(cache.batch)))


class TargetBlock:
    """The per-step query of one request: [vision_start | latent tokens | vision_end]."""

    def __init__(self, seq: PackedSequence, prefix_embeds: torch.Tensor, pos_embed: torch.Tensor):
        split = seq.target_split
        self.tokens = split.length - 2
        self.marker_embeds = prefix_embeds[[split.start, split.end - 1]]
        self.pos_embed = pos_embed
        self.segments = query_segments(split.length)

    def query(self, llm: LanceLLM, x: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] latents, t_tokens [B, N] per-token timesteps -> query embeddings [B, N + 2, H]."""
        latent = llm.embed_latents(x, t_tokens, self.pos_embed)
        markers = self.marker_embeds.to(latent.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([markers[:, :1], latent, markers[:, 1:]], dim=1)


def prefill_branch(llm: LanceLLM, seq: PackedSequence, embeds: torch.Tensor, cache: KVCache, row: int,
                   dropped: tuple[int, ...] = (), uncond_positions: str = "reference_kv") -> BranchSlot:
    """Prefill one branch's prefix into cache row `row`: the whole prefix (cond, nothing `dropped`), or the prefix
    without the tokens of the `dropped` codes (the caption: uncond; plus the media: image-uncond), its positions
    per `uncond_positions`. Returns the branch's one-row slot."""
    pos, target = seq.positions, seq.target_split
    prefix_len = target.start
    if not dropped:
        prefix_splits = [s for s in seq.splits if s.end <= prefix_len]
        prefill_splits(llm, embeds[:prefix_len], pos, prefix_splits, seq.gen_mask, cache, row=row)
        return BranchSlot(slice(row, row + 1), prefix_len, pos[:, target.start:target.end])
    keep, uncond_pos = drop_codes(seq, llm.config, dropped)
    kept_prefix = keep[keep < prefix_len]
    prefix_pos = pos[:, kept_prefix] if uncond_positions == "reference_kv" else uncond_pos[:, :len(kept_prefix)]
    kept_splits = [s for s in seq.splits if s.end <= prefix_len and s.code not in dropped]  # reference rule
    prefill_splits(llm, embeds[kept_prefix], prefix_pos, kept_splits, seq.gen_mask, cache, row=row)
    length = len(kept_prefix)
    return BranchSlot(slice(row, row + 1), length, uncond_pos[:, length:length + target.length])


def slot_velocities(llm: LanceLLM, cache: KVCache, block: TargetBlock, query: torch.Tensor,
                    slots: list[BranchSlot]) -> torch.Tensor:
    """One forward of `query` [rows, L, H], laid out slot after slot, against the cache: projections and MLPs
    batched, attention per slot over that slot's own keys. Returns velocities [rows, N, C] (fp32)."""
    if len(slots) == 1:
        pos = slots[0].query_pos.unsqueeze(0).expand(query.shape[0], -1, -1)
    else:
        pos = torch.cat([s.query_pos.expand(s.rows_in(cache), -1, -1) for s in slots])
    out = llm(query, pos, block.segments, cache=cache, causal=False,
              slots=[CacheSlot(s.rows, s.length) for s in slots])
    return llm.velocity(out[:, 1:-1])


def batched_cfg_fits(rows: int, query_len: int) -> bool:
    """Auto CFG batching: one forward for both branches up to BATCHED_CFG_MAX_TOKENS query tokens per branch."""
    return rows * query_len <= BATCHED_CFG_MAX_TOKENS


@dataclass(frozen=True)
class BranchPrefix:
    """What one CFG branch prefills: a packed sequence, its input embeddings, the codes it drops and how its
    positions are laid out (None: GuidanceOptions.uncond_positions)."""

    seq: PackedSequence
    embeds: torch.Tensor
    dropped: tuple[int, ...] = ()
    positions: str | None = None


@dataclass(frozen=True)
class BranchRule:
    """How one CFG branch is made from a request: from the negative prompt's sequence instead of the request's
    own, without the tokens of the `dropped` codes, positioned per `positions` (None: the guidance option)."""

    from_negative: bool = False
    dropped: tuple[int, ...] = ()
    positions: str | None = None


def cfg_branch_rules(has_negative: bool, count: int) -> list[BranchRule]:
    """The first `count` of [cond, uncond, image-uncond] (the library sampler's and the host path's rule). A
    negative prompt is the uncond prefix (nothing dropped); image-uncond is the uncond prefix without its media,
    positioned as if they never were there (kept positions would leave gaps sized by the media and the caption,
    which this branch must not see)."""
    uncond = BranchRule(from_negative=True) if has_negative else BranchRule(dropped=CAPTION_CODES)
    image_uncond = replace(uncond, dropped=uncond.dropped + MEDIA_CODES, positions="contiguous")
    return [BranchRule(), uncond, image_uncond][:count]


def branch_prefixes(seq: PackedSequence, embeds: torch.Tensor, negative: tuple[PackedSequence, torch.Tensor] | None,
                    count: int) -> list[BranchPrefix]:
    if count == 3 and not has_media(seq):
        raise InputError("image_cfg_scale: this request has no image or video input to guide by (image CFG is "
                         "for edits); set it to 1")
    return [BranchPrefix(*(negative if rule.from_negative else (seq, embeds)), rule.dropped, rule.positions)
            for rule in cfg_branch_rules(negative is not None, count)]


class FlowSampler:
    def __init__(self, llm: LanceLLM, seq: PackedSequence, prefix_embeds: torch.Tensor, target_pos_embed: torch.Tensor,
                 options: SamplerOptions, batch: int, negative: tuple[PackedSequence, torch.Tensor] | None = None,
                 store: PrefixStore | None = None, weights_version=None):
        """prefix_embeds [L, H]: input embeddings of the whole cond sequence (the target payload rows are unused);
        target_pos_embed [N, H]: latent position embedding of the target block; negative: (sequence, its prefix
        embeddings) of a negative prompt, whose whole prefix is then the uncond branch instead of the
        caption-dropped one; store: prefixes kept from earlier runs (reused when the request, the weights and
        `weights_version` are the same)."""
        options.validate()
        self.llm, self.seq, self.opts, self.batch = llm, seq, options, batch
        self.block = TargetBlock(seq, prefix_embeds, target_pos_embed)
        self.timesteps = flow_timesteps(options.steps, options.shift)
        self.guided = any(options.guidance.active(float(t)) for t in self.timesteps[:-1])
        count = (3 if options.guidance.image_guided else 2) if self.guided else 1
        prefixes = branch_prefixes(seq, prefix_embeds, negative, count)
        capacity = max(p.seq.target_split.start + p.seq.target_split.length for p in prefixes)
        self.cache = llm.new_cache(batch * len(prefixes), capacity)
        self.store, self.weights_version = store, weights_version
        self._prefill(prefixes)

    # -- prefix -----------------------------------------------------------------------------------------
    def _prefill(self, prefixes: list[BranchPrefix]) -> None:
        """Branch b's prefix goes to row b * batch and is copied to the branch's other rows (one per seed)."""
        self.slots = []
        positions = [prefix.positions or self.opts.guidance.uncond_positions for prefix in prefixes]
        context = (str(self.llm.dtype), self.weights_version)
        keys = PrefixStore.keys([(p.seq, p.embeds, p.dropped, pos) for p, pos in zip(prefixes, positions)], context) \
            if self.store is not None else [None] * len(prefixes)
        if self.store is not None:
            self.store.begin(keys)
        for branch, (prefix, position, key) in enumerate(zip(prefixes, positions, keys)):
            row = branch * self.batch
            slot = self.store.restore(key, self.cache, row) if self.store is not None else None
            if slot is None:
                slot = prefill_branch(self.llm, prefix.seq, prefix.embeds, self.cache, row, prefix.dropped, position)
                if self.store is not None:
                    self.store.save(key, self.cache, row, slot.length, slot.query_pos)
            self.cache.copy_rows(row, range(row + 1, row + self.batch), slot.length)
            self.slots.append(BranchSlot(slice(row, row + self.batch), slot.length, slot.query_pos))

    # -- steps ------------------------------------------------------------------------------------------
    def sample(self, state: TargetState, on_step: Callable[[StepInfo], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        x, frozen = state.x.to(self.opts.state_dtype), state.frozen
        total = self.opts.steps
        for i in range(total):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled at step {i + 1}/{total}")
            t, dt = float(self.timesteps[i]), float(self.timesteps[i] - self.timesteps[i + 1])
            v_cond, v_uncond, v_image_uncond = self._velocities(x, t, frozen)
            v = v_cond if v_uncond is None else guided_velocity(v_cond, v_uncond, v_image_uncond, self.opts.guidance)
            x0 = x.float() - t * v
            x0[:, :frozen] = x[:, :frozen].float()
            x[:, frozen:] = (x[:, frozen:].float() - v[:, frozen:] * dt).to(x.dtype)
            if on_step is not None:
                on_step(StepInfo(i, total, t, x0, v_cond, v_uncond, v, v_image_uncond))
        return x.float()

    def _velocities(self, x: torch.Tensor, t: float, frozen: int) -> list[torch.Tensor | None]:
        """[v_cond, v_uncond, v_image_uncond], None for the branches that do not run at t."""
        b, n = x.shape[0], x.shape[1]
        t_tokens = torch.full((b, n), t, dtype=torch.float32)
        t_tokens[:, :frozen] = 0.0
        query = self.block.query(self.llm, x, t_tokens)
        slots = self.slots if self.guided and self.opts.guidance.active(t) else self.slots[:1]
        batched = self.opts.batched_cfg
        if batched is None:
            batched = batched_cfg_fits(query.shape[0], query.shape[1])
        if batched and len(slots) > 1:
            velocities = list(self._forward(torch.cat([query] * len(slots)), slots).split(b))
        else:
            velocities = [self._forward(query, [slot]) for slot in slots]
        return velocities + [None] * (3 - len(velocities))

    def _forward(self, query: torch.Tensor, slots: list[BranchSlot]) -> torch.Tensor:
        return slot_velocities(self.llm, self.cache, self.block, query, slots)

