"""Generation requests (t2i, t2v, i2v, image/video edit) turned into packed sequences, embeddings and noise,
then run through the flow sampler. Works on latent tokens [N, C] in (frame, row, column) raster order."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .config import LLMConfig
from .errors import InputError
from .llm import LanceLLM
from .packing import PackedSequence, pack
from .positions import latent_position_embedding
from .sampler import FlowSampler, SamplerOptions, StepInfo, TargetState
from .templates import T2I_SYSTEM, T2V_SYSTEM, Text, Visual, edit_system, vit_visual
from .tokenizer import LanceTokenizer


@dataclass(frozen=True)
class LatentGrid:
    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def rope_grid(self) -> tuple[int, int, int]:
        return (self.frames, 2 * self.height, 2 * self.width)  # x2 cancels the position scan's 2x2 merge


@dataclass
class GenerationInputs:
    """Everything one request feeds the sampler besides the noise."""

    seq: PackedSequence
    target: LatentGrid
    vit_embeds: list[torch.Tensor] = field(default_factory=list)     # [n, H] per ViT block, in order
    source_latents: list[torch.Tensor] = field(default_factory=list)  # [n, C] clean normalized, per source block
    first_frame: torch.Tensor | None = None                           # [h*w, C] i2v clean frame-0 latent
    # the negative prompt packed in the caption's place: the uncond branch's whole prefix; None = caption dropped
    negative_seq: PackedSequence | None = None


def text_to_visual_sequence(tokenizer: LanceTokenizer, cfg: LLMConfig, prompt: str, grid: LatentGrid,
                            video: bool) -> PackedSequence:
    tokenizer.encode_user_text(prompt, "prompt")
    return pack(tokenizer, cfg, T2V_SYSTEM if video else T2I_SYSTEM, [Text(prompt, droppable=True)],
                [Visual("target", grid.tokens, grid.rope_grid)], close_assistant=True, shift_positions=False)


def edit_sequence(tokenizer: LanceTokenizer, cfg: LLMConfig, instruction: str, vit_grid: tuple[int, int, int],
                  source: LatentGrid, video: bool, history: list[Text] = ()) -> PackedSequence:
    """User turn: [earlier-turn texts...] [source ViT block] [source latent block] [instruction]; the target
    block has the source's latent size."""
    tokenizer.encode_user_text(instruction, "instruction")
    user = list(history) + [vit_visual(vit_grid, cfg.spatial_merge_size), Visual("source", source.tokens, source.rope_grid),
                            Text(instruction, droppable=True)]
    return pack(tokenizer, cfg, edit_system("video" if video else "image"), user,
                [Visual("target", source.tokens, source.rope_grid)], close_assistant=True, shift_positions=True)


def latent_pos_embed(cfg: LLMConfig, grid: LatentGrid) -> torch.Tensor:
    c = cfg.constants
    if grid.frames > c.max_latent_frames:
        raise InputError(f"{grid.frames} latent frames exceed the model's maximum of {c.max_latent_frames} "
                         f"({c.max_num_frames} video frames)")
    return latent_position_embedding(grid.frames, grid.height, grid.width, cfg.hidden_size, c.max_latent_size)


def prefix_embeddings(llm: LanceLLM, inputs: GenerationInputs) -> torch.Tensor:
    """[L, H] input embeddings of the cond sequence: text rows from the embedding table, ViT payloads from the
    ViT, source payloads as clean latent tokens (t = 0). The target payload rows are left as text rows."""
    seq = inputs.seq
    embeds = llm.embed_text(seq.ids).clone()
    for block, vit in zip(seq.blocks_with_role("vit"), inputs.vit_embeds):
        embeds[block.payload] = vit.to(embeds)
    sources = seq.blocks_with_role("source")
    for block, latent in zip(sources, inputs.source_latents):
        grid = _grid_of(block, latent)
        t_zero = torch.zeros(latent.shape[0])
        embeds[block.payload] = llm.embed_latents(latent, t_zero, latent_pos_embed(llm.config, grid))
    return embeds


def _grid_of(block, latent: torch.Tensor) -> LatentGrid:
    t, h2, w2 = block.rope_grid
    grid = LatentGrid(t, h2 // 2, w2 // 2)
    if grid.tokens != latent.shape[0]:
        raise InputError(f"condition latent has {latent.shape[0]} tokens, its block expects {grid.tokens}")
    return grid


def initial_noise(inputs: GenerationInputs, seeds: list[int], channels: int) -> torch.Tensor:
    """[B, N, C] target noise. As the reference: one CPU generator per sample seeded with `seed`, drawing
    randn(all latent tokens of the sequence, C) and keeping the target block's rows."""
    seq = inputs.seq
    total = sum(b.tokens for b in seq.blocks if b.role != "vit")
    offset = sum(b.tokens for b in seq.blocks if b.role == "source" and b.start < seq.target.start)
    rows = []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        rows.append(torch.randn(total, channels, generator=generator)[offset:offset + inputs.target.tokens])
    return torch.stack(rows)


def run_generation(llm: LanceLLM, inputs: GenerationInputs, options: SamplerOptions, noise: torch.Tensor,
                   on_step: Callable[[StepInfo], None] | None = None,
                   cancel: Callable[[], bool] | None = None, store=None, weights_version=None) -> torch.Tensor:
    """Denoise `noise` [B, N, C]; returns the final target latents [B, N, C] (normalized, fp32). `store`: a
    PrefixStore of earlier runs' prefixes (see FlowSampler)."""
    x = noise.clone()
    frozen = 0
    if inputs.first_frame is not None:
        frozen = inputs.first_frame.shape[0]
        x[:, :frozen] = inputs.first_frame.to(x)
    with torch.inference_mode():
        negative = None
        if inputs.negative_seq is not None:
            negative = (inputs.negative_seq, prefix_embeddings(llm, replace(inputs, seq=inputs.negative_seq)))
        sampler = FlowSampler(llm, inputs.seq, prefix_embeddings(llm, inputs), latent_pos_embed(llm.config, inputs.target),
                              options, batch=x.shape[0], negative=negative, store=store,
                              weights_version=weights_version)
        return sampler.sample(TargetState(x.to(llm.device), frozen), on_step, cancel)


def tokens_to_video(tokens: torch.Tensor, grid: LatentGrid) -> torch.Tensor:
    """[B, N, C] raster tokens -> [B, C, t, h, w]."""
    b, _, c = tokens.shape
    return tokens.view(b, grid.frames, grid.height, grid.width, c).permute(0, 4, 1, 2, 3).contiguous()


def video_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, t, h, w] -> [B, N, C] raster tokens."""
    b, c = latents.shape[:2]
    return latents.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
