"""Saving results: PNG for single frames, MP4 (imageio-ffmpeg, H.264) for clips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, H, W, 3] float in 0..1 -> uint8 (rounded)."""
    return torch.floor(frames.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def save_png(frame: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(frame[None])[0]).save(path)
    return path


def save_mp4(frames: torch.Tensor, path: str | Path, fps: float = 12.0) -> Path:
    """Frames [T, H, W, 3] in 0..1 -> MP4. Odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise InputError(f"video frames must be [T, H, W, 3], got {data.shape}")
    pad_h, pad_w = data.shape[1] % 2, data.shape[2] % 2
    if pad_h or pad_w:
        data = np.pad(data, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(str(path), (data.shape[2], data.shape[1]), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1, quality=8)
    writer.send(None)
    for frame in data:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def save_frames(frames: torch.Tensor, path: str | Path, fps: float = 12.0) -> Path:
    """One frame -> PNG, several -> MP4 (the suffix of `path` is adjusted to match)."""
    path = Path(path)
    if frames.shape[0] == 1:
        return save_png(frames[0], path.with_suffix(".png"))
    return save_mp4(frames, path.with_suffix(".mp4"), fps)
