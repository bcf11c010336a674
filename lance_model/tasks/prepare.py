"""User input -> request: prompts and sizes checked, source media read and encoded, the sequence packed (with
the conversation's earlier turns when asked for, and the negative prompt's sequence)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..io.inputs import as_frames, latent_frames, optional_text, require_text, round_size
from ..io.media import preset_sides, vae_pixels, vit_pixels
from ..io.validation import require_bool, require_callable, require_choice
from ..runtime.session import LanceSession
from .context import LanceContext
from .encoders import condition_latent, vit_embeddings
from .packing import PackedSequence, pack
from .request import GenerationInputs, LatentGrid, video_to_tokens
from .settings import GenerationSettings, check_context
from .templates import (
    IMAGE_QUESTION_SYSTEM,
    T2I_SYSTEM,
    T2V_SYSTEM,
    VIDEO_QUESTION_SYSTEM,
    Text,
    Visual,
    edit_system,
    vit_visual,
)
from .understanding import understanding_sequence

log = logging.getLogger(__name__)
ENHANCE_INSTRUCTION = (
    "You write prompts for a text-to-{kind} model. Rewrite the user's short prompt into one detailed paragraph: "
    "the main subject, its appearance, colors, materials, the setting and background, lighting, composition{motion}. "
    "Keep every detail the user gave and invent nothing that contradicts it. Answer with the rewritten prompt only."
)


# -- generation requests ------------------------------------------------------------------------------------
def text_to_image(session: LanceSession, prompt: str, width: int, height: int,
                  negative_prompt: str = "") -> GenerationInputs:
    grid = LatentGrid(1, *latent_size(session, height, width))
    sequence = lambda text: text_to_visual_sequence(session, text, grid, video=False)
    return GenerationInputs(sequence(require_text(prompt, "prompt")), grid,
                            negative_seq=negative_sequence(negative_prompt, sequence))


def text_to_video(session: LanceSession, prompt: str, width: int, height: int, num_frames: int, start_image=None,
                  resolution: str = "video_480p", settings: GenerationSettings | None = None,
                  negative_prompt: str = "") -> GenerationInputs:
    prompt = require_text(prompt, "prompt")
    c = session.config.constants
    frames = latent_frames(num_frames, c.vae_temporal_factor, c.max_num_frames)
    first = None
    if start_image is not None:
        image = as_frames(start_image, "start_image")[:1]
        latent = _condition(session, vae_pixels(image, preset_sides(resolution)[0]), settings)
        if (latent.shape[-2], latent.shape[-1]) != latent_size(session, height, width):
            log.info("i2v: output size follows the start image bucket: %dx%d",
                     latent.shape[-1] * c.vae_spatial_factor, latent.shape[-2] * c.vae_spatial_factor)
        height, width = latent.shape[-2] * c.vae_spatial_factor, latent.shape[-1] * c.vae_spatial_factor
        first = video_to_tokens(latent)[0]
    grid = LatentGrid(frames, *latent_size(session, height, width))
    sequence = lambda text: text_to_visual_sequence(session, text, grid, video=True)
    return GenerationInputs(sequence(prompt), grid, first_frame=first,
                            negative_seq=negative_sequence(negative_prompt, sequence))


def edit(session: LanceSession, media, instruction: str, *, video: bool, resolution: str, fps: float | None = None,
         settings: GenerationSettings | None = None, negative_prompt: str = "") -> GenerationInputs:
    settings = settings or GenerationSettings()
    require_bool(video, "video")
    instruction = require_text(instruction, "instruction")
    frames = source_frames(session, media, video, fps, settings.context)
    vae_side, vit_side = preset_sides(resolution)
    source = _condition(session, vae_pixels(frames, vae_side), settings)
    grid = LatentGrid(*source.shape[2:])
    check_latent_size(session, grid.height, grid.width, f"the {resolution} bucket of this source")
    vit_px = vit_pixels(frames, vit_side)
    embeds = vit_embeddings(session, vit_px, settings.cancel)
    _, vit_grid = session.vit.patchify(vit_px)
    lines = history(session, settings.context, settings.include_history)
    sequence = lambda text: edit_sequence(session, text, vit_grid, grid, video, lines)
    return GenerationInputs(sequence(instruction), grid, [embeds], [video_to_tokens(source)[0]],
                            negative_seq=negative_sequence(negative_prompt, sequence))


def _condition(session: LanceSession, pixels: torch.Tensor, settings: GenerationSettings | None) -> torch.Tensor:
    settings = settings or GenerationSettings()
    return condition_latent(session, pixels, seed=settings.seed, sampling=settings.condition_sampling,
                            cancel=settings.cancel)


def text_to_visual_sequence(session: LanceSession, prompt: str, grid: LatentGrid, video: bool) -> PackedSequence:
    session.tokenizer.encode_user_text(prompt, "prompt")
    return pack(session.tokenizer, session.config, T2V_SYSTEM if video else T2I_SYSTEM, [Text(prompt, droppable=True)],
                [Visual("target", grid.tokens, grid.rope_grid)], close_assistant=True, shift_positions=False)


def edit_sequence(session: LanceSession, instruction: str, vit_grid: tuple[int, int, int], source: LatentGrid,
                  video: bool, earlier: list[Text] = ()) -> PackedSequence:
    """User turn: [earlier-turn texts...] [source ViT block] [source latent block] [instruction]; the target
    block has the source's latent size."""
    cfg = session.config
    session.tokenizer.encode_user_text(instruction, "instruction")
    user = list(earlier) + [vit_visual(vit_grid, cfg.spatial_merge_size), Visual("source", source.tokens, source.rope_grid),
                            Text(instruction, droppable=True)]
    return pack(session.tokenizer, cfg, edit_system("video" if video else "image"), user,
                [Visual("target", source.tokens, source.rope_grid)], close_assistant=True, shift_positions=True)


def negative_sequence(negative_prompt, sequence: Callable[[str], PackedSequence]) -> PackedSequence | None:
    """The negative prompt packed like the prompt (None for an empty one: the official caption-dropped branch)."""
    if negative_prompt is None or (isinstance(negative_prompt, str) and not negative_prompt.strip()):
        return None
    return sequence(require_text(negative_prompt, "negative_prompt"))


# -- understanding requests ---------------------------------------------------------------------------------
@dataclass
class TextRequest:
    """An understanding prompt: the packed sequence, its ViT embeddings, the media it is about, the question and
    the conversation it continues."""

    seq: PackedSequence
    vit_embeds: list[torch.Tensor]
    frames: np.ndarray | None
    question: str
    context: LanceContext | None

    @property
    def is_video(self) -> bool:
        return self.frames is not None and len(self.frames) > 1


def question(session: LanceSession, media, question_text: str, *, instruction: str | None, resolution: str | None,
             fps: float | None, context: LanceContext | None, include_history: bool,
             cancel: Callable[[], bool] | None) -> TextRequest:
    """A question about an image/video (or the context's last media)."""
    check_context(context)
    if context is not None:
        context.check_model(session.model_id)
    require_bool(include_history, "include_history")
    require_callable(cancel, "cancel")
    question_text = optional_text(question_text, "question")
    if media is None and context is not None:
        media = context.last_media()
    frames = as_frames(media, "media", fps) if media is not None else None
    is_video = frames is not None and len(frames) > 1
    embeds, vit_grid = [], None
    if frames is not None:
        vit_side = preset_sides(resolution or ("video_480p" if is_video else "image_768res"))[1]
        vit_px = vit_pixels(frames, vit_side)
        embeds = [vit_embeddings(session, vit_px, cancel)]
        vit_grid = session.vit.patchify(vit_px)[1]
    elif not question_text:
        raise InputError("question is empty and no image or video was given")
    instruction = instruction or (VIDEO_QUESTION_SYSTEM if is_video else IMAGE_QUESTION_SYSTEM)
    seq = understanding_sequence(session.tokenizer, session.config, require_text(instruction, "instruction"),
                                 question_text, vit_grid, history(session, context, include_history))
    return TextRequest(seq, embeds, frames, question_text, context)


def enhancement(session: LanceSession, prompt: str, target: str, cancel) -> PackedSequence:
    """The prompt-enhancement request: Lance's understanding expert asked to rewrite a short prompt."""
    require_choice(target, "target", ("image", "video"))
    require_callable(cancel, "cancel")
    prompt = require_text(prompt, "prompt")
    motion = ", and the motion of subjects and camera over time" if target == "video" else ""
    return understanding_sequence(session.tokenizer, session.config,
                                  ENHANCE_INSTRUCTION.format(kind=target, motion=motion), prompt, None)


# -- shared pieces ------------------------------------------------------------------------------------------
def latent_size(session: LanceSession, height: int, width: int) -> tuple[int, int]:
    c = session.config.constants
    limit = c.vae_spatial_factor * c.max_latent_size
    h = round_size(height, c.vae_spatial_factor, "height", limit) // c.vae_spatial_factor
    w = round_size(width, c.vae_spatial_factor, "width", limit) // c.vae_spatial_factor
    return h, w


def check_latent_size(session: LanceSession, h: int, w: int, what: str) -> None:
    c = session.config.constants
    if max(h, w) > c.max_latent_size:
        limit = c.max_latent_size * c.vae_spatial_factor
        raise InputError(f"{what} is {w * c.vae_spatial_factor}x{h * c.vae_spatial_factor}; the model supports "
                         f"at most {limit} px per side: choose a smaller resolution preset")


def source_frames(session: LanceSession, media, video: bool, fps: float | None,
                  context: LanceContext | None) -> np.ndarray:
    kind = "video" if video else "image"
    if media is None and context is not None:
        media = context.last_media(kind)
    # a video keeps at least one temporal-compression unit of frames when sampled (edits need a whole video)
    min_frames = session.config.constants.vae_temporal_factor + 1 if video else 1
    frames = as_frames(media, kind, fps, min_frames)
    if not video and len(frames) != 1:
        raise InputError(f"image has {len(frames)} frames; use the video edit for clips (or pass one frame)")
    if video and len(frames) < 2:
        raise InputError(f"video has {len(frames)} frame; a video needs at least 2 frames (typically 4k+1 "
                         f"such as 5, 17 or 61): use edit_image for a single image")
    if video:
        t = session.config.constants.vae_temporal_factor
        usable = min((len(frames) - 1) // t * t + 1, session.config.constants.max_num_frames)
        if usable != len(frames):
            log.warning("video has %d frames: using the first %d (a 4k+1 count)", len(frames), usable)
        frames = frames[:usable]
    return frames


def history(session: LanceSession, context: LanceContext | None, include: bool) -> list[Text]:
    """The context's earlier turns as prompt text, one line each (only when asked for). An earlier answer is
    model text and may hold reserved tokens (e.g. grounding markers): they are removed, so that no earlier turn
    can become a control token of the new prompt (user text with them is refused before it becomes a turn)."""
    if not include or context is None:
        return []
    return [Text(session.tokenizer.without_reserved(line) + "\n") for line in context.transcript()]


def with_history(session: LanceSession, prompt: str, settings: GenerationSettings) -> str:
    """t2i/t2v have no user-turn slot besides the caption: earlier turns are prepended to it."""
    lines = [t.text for t in history(session, settings.context, settings.include_history)]
    return "".join(lines) + prompt if lines and isinstance(prompt, str) else prompt
