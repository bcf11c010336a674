"""One denoising step's velocity for a host's own sampler (e.g. ComfyUI's samplers through
lance_nodes/native_model.py), with the prefix KV cache built lazily inside.

The host asks for velocities of the target latents of several chunks at once, each chunk tied to a
`BranchRequest` (a request and which of its branches). The prefix of every (request, branch) is prefilled once
into one shared cache, laid out as the library sampler lays it out (cond rows first, then uncond, then
image-uncond, one row per sample), so the velocities equal `FlowSampler`'s. `reset()` drops the cache;
a host calls it once per sampling run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import InputError
from .generation import GenerationInputs, latent_pos_embed, prefix_embeddings
from .llm import LanceLLM
from .packing import PackedSequence, has_media
from .sampler import BranchSlot, TargetBlock, batched_cfg_fits, cfg_branch_rules, prefill_branch, slot_velocities

BRANCH_ORDER = ("cond", "uncond", "image_uncond")   # the library sampler's row order of the CFG branches


@dataclass(frozen=True, eq=False)
class BranchRequest:
    """A request and one of its CFG branches: its prefix without the tokens of the `dropped` codes (none: the
    full prefix; the caption: the official unconditional branch; plus the media: image CFG's branch). `kind`
    (one of BRANCH_ORDER) places its rows in the cache as the library sampler does."""

    inputs: GenerationInputs
    dropped: tuple[int, ...] = ()
    kind: str = "cond"
    uncond_positions: str = "reference_kv"

    @property
    def key(self) -> tuple:
        return (id(self.inputs), self.dropped, self.uncond_positions)

    @property
    def rank(self) -> int:
        return BRANCH_ORDER.index(self.kind)


def cfg_branches(inputs: GenerationInputs) -> list[BranchRequest]:
    """[cond, uncond] requests of one generation request, plus image-uncond when it has media (the library
    sampler's rule, sampler.cfg_branch_rules)."""
    negative = with_sequence(inputs, inputs.negative_seq) if inputs.negative_seq is not None else None
    rules = cfg_branch_rules(negative is not None, 3 if has_media(inputs.seq) else 2)
    return [BranchRequest(negative if rule.from_negative else inputs, rule.dropped, kind,
                          rule.positions or "reference_kv") for rule, kind in zip(rules, BRANCH_ORDER)]


def with_sequence(inputs: GenerationInputs, seq: PackedSequence) -> GenerationInputs:
    """The same request (ViT embeddings, condition latents, first frame) with another packed sequence, e.g. the
    negative prompt in the caption's place."""
    return replace(inputs, seq=seq)


class PrefixVelocity:
    def __init__(self, llm: LanceLLM):
        self.llm = llm
        self.reset()

    def reset(self) -> None:
        """Forget the prefix cache (the host's weights or requests may change between runs)."""
        self._cache = None
        self._rows = 0
        self._requests: dict[tuple, BranchRequest] = {}   # keeps the requests alive while their id() is a key
        self._slots: dict[tuple, BranchSlot] = {}
        self._embeds: dict[int, torch.Tensor] = {}
        self._blocks: dict[int, TargetBlock] = {}
        self.prefills = 0

    @property
    def cache_bytes(self) -> int:
        if self._cache is None:
            return 0
        return sum(k.numel() * k.element_size() * 2 for k in self._cache.keys)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, branches: list[BranchRequest],
                 batched: bool | None = None) -> torch.Tensor:
        """x [R, N, C] target latents (normalized) as len(branches) equal chunks of rows, t [R] one timestep per
        row. Returns the velocities [R, N, C] (fp32) in x's row order. Chunks run in the library's branch order
        (cond first), batched as the library does (auto: by size)."""
        if x.shape[0] % len(branches):
            raise InputError(f"{x.shape[0]} latent rows cannot be split into {len(branches)} branch chunks")
        rows = x.shape[0] // len(branches)
        for branch in branches:
            if branch.inputs.target.tokens != x.shape[1]:
                raise InputError(f"the latent has {x.shape[1]} tokens but the conditioning's target block expects "
                                 f"{branch.inputs.target.tokens}: use the LATENT made with this conditioning")
        order = sorted(range(len(branches)), key=lambda i: branches[i].rank)
        with torch.no_grad():
            self._ensure([branches[i] for i in order], rows)
            queries = self._queries([branches[i] for i in order], [x[i * rows:(i + 1) * rows] for i in order],
                                    [t[i * rows:(i + 1) * rows] for i in order])
            slots = [self._slots[branches[i].key] for i in order]
            if batched is None:
                batched = batched_cfg_fits(rows, queries[0].shape[1])
            block = self._block(branches[order[0]].inputs)
            if batched or len(slots) == 1:
                v = slot_velocities(self.llm, self._cache, block, torch.cat(queries) if len(queries) > 1 else queries[0], slots)
                parts = list(v.split(rows))
            else:
                parts = [slot_velocities(self.llm, self._cache, block, q, [s]) for q, s in zip(queries, slots)]
        out = [None] * len(branches)
        for position, index in enumerate(order):
            out[index] = parts[position]
        return torch.cat(out) if len(out) > 1 else out[0]

    # -- prefix cache -----------------------------------------------------------------------------------
    def _ensure(self, branches: list[BranchRequest], rows: int) -> None:
        """Prefill every branch not yet cached; a new branch rebuilds the cache with all known branches."""
        if self._cache is not None and rows == self._rows and all(b.key in self._slots for b in branches):
            return
        known = list(self._requests.values()) if rows == self._rows else []
        wanted = {b.key: b for b in known + branches}
        ordered = sorted(wanted.values(), key=lambda b: b.rank)
        capacity = max(b.inputs.seq.target_split.start + b.inputs.seq.target_split.length for b in ordered)
        self._cache = self.llm.new_cache(rows * len(ordered), capacity)
        self._slots, self._requests, self._rows = {}, {}, rows
        for index, branch in enumerate(ordered):
            row = index * rows
            slot = prefill_branch(self.llm, branch.inputs.seq, self._prefix_embeds(branch.inputs), self._cache, row,
                                  branch.dropped, branch.uncond_positions)
            self._cache.copy_rows(row, range(row + 1, row + rows), slot.length)
            self._slots[branch.key] = BranchSlot(slice(row, row + rows), slot.length, slot.query_pos)
            self._requests[branch.key] = branch
            self.prefills += 1

    def _prefix_embeds(self, inputs: GenerationInputs) -> torch.Tensor:
        if id(inputs) not in self._embeds:
            self._embeds[id(inputs)] = prefix_embeddings(self.llm, inputs)
        return self._embeds[id(inputs)]

    def _block(self, inputs: GenerationInputs) -> TargetBlock:
        if id(inputs) not in self._blocks:
            self._blocks[id(inputs)] = TargetBlock(inputs.seq, self._prefix_embeds(inputs),
                                                   latent_pos_embed(self.llm.config, inputs.target))
        return self._blocks[id(inputs)]

    # -- queries ----------------------------------------------------------------------------------------
    def _queries(self, branches: list[BranchRequest], xs: list[torch.Tensor], ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One query per chunk; chunks with equal latents and timesteps share one embedding (as the library's
        batched CFG repeats one query), so results do not depend on the GEMM batch size."""
        queries, seen = [], []
        for branch, x, t in zip(branches, xs, ts):
            x = self._with_first_frame(branch.inputs, x)
            t_tokens = self._token_timesteps(branch.inputs, t, x.shape[1])
            for (sx, st, q) in seen:
                if torch.equal(sx, x) and torch.equal(st, t_tokens):
                    queries.append(q)
                    break
            else:
                q = self._block(branch.inputs).query(self.llm, x, t_tokens)
                seen.append((x, t_tokens, q))
                queries.append(q)
        return queries

    @staticmethod
    def _with_first_frame(inputs: GenerationInputs, x: torch.Tensor) -> torch.Tensor:
        """i2v: the frozen frame-0 rows are the request's exact clean latent (not a host's round trip of it)."""
        if inputs.first_frame is None:
            return x
        x = x.clone()
        x[:, :inputs.first_frame.shape[0]] = inputs.first_frame.to(x)
        return x

    @staticmethod
    def _token_timesteps(inputs: GenerationInputs, t: torch.Tensor, tokens: int) -> torch.Tensor:
        t_tokens = t.detach().to("cpu", torch.float32).view(-1, 1).expand(-1, tokens).clone()
        if inputs.first_frame is not None:
            t_tokens[:, :inputs.first_frame.shape[0]] = 0.0
        return t_tokens
