"""Per-task sequence packing: token ids, modality codes, attention splits, expert routing and 3-D positions.

A packed sequence is the reference's single-sample layout: text tokens, and visual blocks
`[vision_start, payload..., vision_end]` whose payload ids are all the placeholder id. Codes per token:
-1 template text, 0 caption/instruction (dropped for CFG), 1 target latents, 2 source latents, 4 ViT tokens.
Splits are maximal runs of one text code or one visual block; their attention mode is `causal` for text,
`full` for ViT blocks, `full_noise` for clean condition latents and `noise` for the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..nn.config import LLMConfig
from ..nn.positions import GridBlock, apply_modality_shift, rope_index
from ..nn.tokenizer import LanceTokenizer
from .templates import Text, Visual, render

CODE_TEMPLATE, CODE_CAPTION, CODE_TARGET, CODE_SOURCE, CODE_VIT = -1, 0, 1, 2, 4
ROLE_CODE = {"target": CODE_TARGET, "source": CODE_SOURCE, "vit": CODE_VIT}
ROLE_MODE = {"target": "noise", "source": "full_noise", "vit": "full"}


@dataclass(frozen=True)
class Split:
    start: int
    length: int
    mode: str   # causal | full | full_noise | noise
    code: int   # modality code of its first token

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Block:
    role: str
    start: int          # index of vision_start
    tokens: int         # payload count
    rope_grid: tuple[int, int, int]

    @property
    def payload(self) -> slice:
        return slice(self.start + 1, self.start + 1 + self.tokens)


@dataclass
class PackedSequence:
    ids: torch.Tensor          # [L] int64
    codes: torch.Tensor        # [L] int64
    blocks: list[Block]
    splits: list[Split]
    positions: torch.Tensor    # [3, L] int64
    shift_positions: bool      # the modality shift rule applies (sequences with condition blocks)
    gen_mask: torch.Tensor = field(init=False)  # [L] bool: latent payload tokens use the generation expert

    def __post_init__(self):
        self.gen_mask = torch.zeros(len(self.ids), dtype=torch.bool)
        for block in self.blocks:
            if block.role != "vit":
                self.gen_mask[block.payload] = True

    def __len__(self) -> int:
        return len(self.ids)

    def blocks_with_role(self, role: str) -> list[Block]:
        return [b for b in self.blocks if b.role == role]

    @property
    def target(self) -> Block:
        targets = self.blocks_with_role("target")
        if len(targets) != 1:
            raise ValueError(f"sequence has {len(targets)} target blocks, expected 1")
        return targets[0]

    @property
    def target_split(self) -> Split:
        return next(s for s in self.splits if s.mode == "noise")


def pack(tokenizer: LanceTokenizer, cfg: LLMConfig, system: str, user: list, assistant: list, *,
         close_assistant: bool, shift_positions: bool) -> PackedSequence:
    """Tokenize the rendered chat, expand each visual triple to its payload count, tag codes, cut splits and
    compute positions (with the modality shift rule when `shift_positions`)."""
    ids = tokenizer.encode(render(system, user, assistant, close_assistant))
    visuals = [p for p in user + assistant if isinstance(p, Visual)]
    ids, blocks = _expand_visuals(ids, visuals, tokenizer)
    codes = torch.full((len(ids),), CODE_TEMPLATE, dtype=torch.long)
    for block in blocks:
        codes[block.start:block.payload.stop + 1] = ROLE_CODE[block.role]
    for part in user + assistant:
        if isinstance(part, Text) and part.droppable:
            _tag_caption(ids, codes, tokenizer.encode(part.text), part.text)
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    positions = sequence_positions(cfg, blocks, len(ids), codes, shift_positions)
    return PackedSequence(ids_tensor, codes, blocks, _splits(codes, blocks), positions, shift_positions)


def sequence_positions(cfg: LLMConfig, blocks: list[Block], length: int, codes: torch.Tensor,
                       shift_positions: bool) -> torch.Tensor:
    grids = [GridBlock(b.payload.start, b.rope_grid) for b in blocks]
    pos = rope_index(length, grids, cfg.spatial_merge_size, cfg.tokens_per_second)
    if shift_positions:
        pos = apply_modality_shift(pos, codes, CODE_VIT, CODE_SOURCE, CODE_TARGET)
    return pos


CAPTION_CODES = (CODE_CAPTION,)           # the official CFG-uncond branch drops the caption
MEDIA_CODES = (CODE_SOURCE, CODE_VIT)      # image CFG's extra branch also drops the condition media blocks


def drop_codes(seq: PackedSequence, cfg: LLMConfig, codes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A CFG branch without the tokens of `codes` (whole visual blocks for media codes): (kept token indexes of
    the full sequence, positions of the shortened sequence)."""
    dropped = torch.isin(seq.codes, torch.tensor(codes, dtype=seq.codes.dtype))
    keep = torch.nonzero(~dropped).squeeze(1)
    new_index = torch.full((len(seq),), -1, dtype=torch.long)
    new_index[keep] = torch.arange(len(keep))
    blocks = [Block(b.role, int(new_index[b.start]), b.tokens, b.rope_grid) for b in seq.blocks
              if ROLE_CODE[b.role] not in codes]
    return keep, sequence_positions(cfg, blocks, len(keep), seq.codes[keep], seq.shift_positions)


def has_media(seq: PackedSequence) -> bool:
    """Whether the sequence holds condition media (ViT or source latent blocks) that image CFG can drop."""
    return any(ROLE_CODE[b.role] in MEDIA_CODES for b in seq.blocks)


def _expand_visuals(ids: list[int], visuals: list[Visual], tokenizer: LanceTokenizer) -> tuple[list[int], list[Block]]:
    sp = tokenizer.special
    out, blocks, k, i = [], [], 0, 0
    while i < len(ids):
        if ids[i:i + 3] == [sp.vision_start, sp.placeholder, sp.vision_end]:
            if k >= len(visuals):
                raise InputError("the prompt contains more visual blocks than media were given")
            visual = visuals[k]
            blocks.append(Block(visual.role, len(out), visual.tokens, visual.rope_grid))
            out += [sp.vision_start] + [sp.placeholder] * visual.tokens + [sp.vision_end]
            k, i = k + 1, i + 3
        else:
            out.append(ids[i])
            i += 1
    if k != len(visuals):
        raise InputError(f"{len(visuals)} media were given but the prompt has {k} visual blocks")
    return out, blocks


def _tag_caption(ids: list[int], codes: torch.Tensor, caption_ids: list[int], text: str) -> None:
    """Mark the first exact occurrence of the standalone-tokenized caption (the reference's rule)."""
    n = len(caption_ids)
    for start in range(len(ids) - n + 1):
        if ids[start:start + n] == caption_ids:
            codes[start:start + n] = CODE_CAPTION
            return
    raise InputError(f"could not locate the prompt {text!r} in the tokenized template (tokenizer merged it with its surroundings)")


def _splits(codes: torch.Tensor, blocks: list[Block]) -> list[Split]:
    block_at = {b.start: b for b in blocks}
    splits, i, n = [], 0, len(codes)
    while i < n:
        if i in block_at:
            block = block_at[i]
            length = block.tokens + 2
            splits.append(Split(i, length, ROLE_MODE[block.role], ROLE_CODE[block.role]))
        else:
            code, length = int(codes[i]), 1
            while i + length < n and i + length not in block_at and int(codes[i + length]) == code:
                length += 1
            splits.append(Split(i, length, "causal", code))
        i += length
    return splits
