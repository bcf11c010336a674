"""LanceContext: the conversation carried between calls (understand -> edit, multi-turn edits).

Immutable: every call returns a new context with its turn appended, so a host that caches node outputs
(ComfyUI) never sees an earlier context change. Media are kept as CPU float frames [T, H, W, 3] in 0..1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Turn:
    task: str                          # t2i, t2v, i2v, image_edit, video_edit, x2t_image, x2t_video
    request: str                       # prompt / instruction / question
    response: str = ""                 # the answer of an understanding turn
    media: torch.Tensor | None = None  # the turn's visual result (generation) or input (understanding)

    @property
    def media_kind(self) -> str | None:
        if self.media is None:
            return None
        return "image" if self.media.shape[0] == 1 else "video"


@dataclass(frozen=True)
class LanceContext:
    model_id: str
    turns: tuple[Turn, ...] = ()

    def append(self, turn: Turn) -> "LanceContext":
        return LanceContext(self.model_id, self.turns + (turn,))

    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise InputError(f"context comes from another model ({self.model_id}); this model is {model_id}. "
                             "Start a new conversation or connect the context of this model's nodes.")

    def last_media(self, kind: str | None = None) -> torch.Tensor | None:
        """The most recent image/video of the conversation (e.g. the last edit result), optionally of one kind."""
        for turn in reversed(self.turns):
            if turn.media is not None and (kind is None or turn.media_kind == kind):
                return turn.media
        return None

    def transcript(self) -> list[str]:
        """Earlier turns as text lines, oldest first (used when a call asks to include the history)."""
        lines = []
        for turn in self.turns:
            lines.append(f"{turn.request}")
            if turn.response:
                lines.append(turn.response)
        return lines

    def summary(self) -> str:
        rows = [f"model: {self.model_id}"]
        for i, turn in enumerate(self.turns, 1):
            media = f" [{turn.media_kind} {tuple(turn.media.shape[:3])}]" if turn.media is not None else ""
            answer = f" -> {turn.response}" if turn.response else ""
            rows.append(f"{i}. {turn.task}: {turn.request}{answer}{media}")
        return "\n".join(rows)
