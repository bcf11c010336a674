"""Normalising user inputs of the task API (media in any accepted form, prompts, sizes) with clear errors."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from .media import frames_from_tensor, load_image, load_video, sample_frame_indices
from .validation import is_int, require_float

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".npz"}


def as_frames(media, what: str, fps: float | None = None, min_frames: int = 1) -> np.ndarray:
    """Image/video input -> uint8 [T, H, W, 3]. Accepts a ComfyUI IMAGE tensor [T, H, W, 3] in 0..1, a PIL image,
    a uint8 array, or a file path. Videos read from files (or given an `fps`) are sampled with the reference
    rule (about 12 fps over at most 6 s, a 4k+1 count, at least `min_frames` where the clip has them)."""
    if media is None:
        raise InputError(f"{what} is missing")
    if fps is not None:
        fps = require_float(fps, "fps", above=0.0, maximum=1000.0)
    if isinstance(media, (str, Path)):
        path = Path(media).expanduser()
        if path.suffix.lower() in VIDEO_SUFFIXES:
            frames, file_fps = load_video(path)
            return frames[sample_frame_indices(len(frames), file_fps, min_count=min_frames)]
        return np.asarray(load_image(path, what))[None]
    if isinstance(media, Image.Image):
        return np.asarray(load_image(media, what))[None]
    if isinstance(media, torch.Tensor):
        frames = frames_from_tensor(media, what)
    elif isinstance(media, np.ndarray):
        frames = media if media.ndim == 4 else media[None]
        if frames.dtype != np.uint8 or frames.shape[-1] != 3:
            raise InputError(f"{what} array must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    else:
        raise InputError(f"{what} must be an image tensor [T, H, W, 3], a PIL image, a uint8 array or a file path; "
                         f"got {type(media).__name__}")
    if fps is not None and len(frames) > 1:
        frames = frames[sample_frame_indices(len(frames), fps, min_count=min_frames)]
    return frames


def unit_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, H, W, 3] in 0..1 (what contexts keep)."""
    return torch.from_numpy(np.array(frames)).float().div(255.0)  # a copy: source arrays may be read-only


def require_text(text, what: str, max_chars: int = 20000) -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise InputError(f"{what} is empty; write what you want")
    if len(text) > max_chars:
        raise InputError(f"{what} is {len(text)} characters long; the limit is {max_chars}")
    return text


def optional_text(text, what: str) -> str:
    """Like require_text, but an empty or missing text is allowed (returns "")."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return ""
    return require_text(text, what)


def round_size(value: int, multiple: int, what: str, maximum: int) -> int:
    """Sizes are floored to a multiple of the VAE factor (the reference floors too); the change is logged."""
    if not is_int(value) or value < multiple:
        raise InputError(f"{what} must be an integer >= {multiple}, got {value!r}")
    if value > maximum:
        raise InputError(f"{what} {value} exceeds the model's maximum of {maximum} pixels")
    rounded = int(value) // multiple * multiple
    if rounded != value:
        log.warning("%s %d is not a multiple of %d: using %d", what, value, multiple, rounded)
    return rounded


def latent_frames(num_frames: int, temporal_factor: int, max_frames: int) -> int:
    """Requested video frames -> latent frames ((F-1)//4 + 1); the decoded clip has 4(t-1)+1 frames."""
    if not is_int(num_frames) or num_frames < 1:
        raise InputError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if num_frames > max_frames:
        raise InputError(f"num_frames {num_frames} exceeds the model's maximum of {max_frames}")
    frames = (num_frames - 1) // temporal_factor + 1
    decoded = temporal_factor * (frames - 1) + 1
    if decoded != num_frames:
        log.warning("num_frames %d is not 4k+1: the video will have %d frames", num_frames, decoded)
    return frames
