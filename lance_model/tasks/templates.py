"""Chat templates and system prompts of the reference (exact strings; the apostrophes are U+2019)."""
from __future__ import annotations

from dataclasses import dataclass

from ..nn.tokenizer import IM_END, IM_START, VIDEO_PAD, VISION_END, VISION_START

T2V_SYSTEM = ("Describe the video by detailing the color, quantity, visible text, shape, size, texture, spatial "
              "relationships and motion/camera movements of the objects and background:")
T2I_SYSTEM = ("Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships "
              "of the objects and background:")
_EDIT_SYSTEM = ("Describe the key features of the input {x} (color, shape, size, texture, objects, background), then "
                "explain how the user\u2019s text instruction should alter or modify the {x}. Generate a new {x} that "
                "meets the user\u2019s requirements while maintaining consistency with the original input where appropriate.")
IMAGE_QUESTION_SYSTEM = "Look at the image carefully and answer the question."
VIDEO_QUESTION_SYSTEM = "Watch the video carefully and answer the question."


def edit_system(media: str) -> str:
    """media: "image" or "video" (the reference derives it from the request; we always pass the real kind)."""
    return _EDIT_SYSTEM.format(x=media)


@dataclass(frozen=True)
class Text:
    text: str
    droppable: bool = False  # the caption/instruction: tagged code 0 and dropped in the CFG-uncond branch


@dataclass(frozen=True)
class Visual:
    """A visual block: `role` is "vit" (understanding tokens), "source" (clean condition latents) or "target"."""

    role: str
    tokens: int                      # payload token count
    rope_grid: tuple[int, int, int]  # grid in pre-merge units for the position scan


def vit_visual(grid: tuple[int, int, int], merge_size: int) -> Visual:
    """A ViT block: `grid` counts pre-merge patches; the LLM gets one token per merge x merge patches."""
    return Visual("vit", grid[0] * grid[1] * grid[2] // (merge_size ** 2), grid)


def render(system: str, user: list, assistant: list, close_assistant: bool) -> str:
    """The chat string with one `<vision_start><video_pad><vision_end>` triple per visual block."""
    def items(parts):
        return "".join(p.text if isinstance(p, Text) else VISION_START + VIDEO_PAD + VISION_END for p in parts)

    text = (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{items(user)}{IM_END}\n"
            f"{IM_START}assistant\n{items(assistant)}")
    return text + IM_END if close_assistant else text
