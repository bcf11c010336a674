"""Input media preprocessing, reproducing the reference pipeline (PIL bicubic bucket resize, then normalisation).

Frames travel as uint8 `[T, H, W, 3]` numpy arrays (or PIL images); pixel tensors come out as float32 `[3, T, H, W]`.
VAE branch: bucket at the preset's VAE side, values in [-1, 1].
ViT branch: bucket at the preset's ViT side, center-crop to multiples of 28, CLIP normalisation, even frame count.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .validation import require_unit_range

# preset -> (VAE side, ViT side); the bucket area is side**2.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    "image_256res": (256, 224),
    "video_192p": (256, 224),
    "image_512res": (512, 448),
    "image_768res": (768, 672),
    "video_360p": (480, 476),
    "video_480p": (640, 616),
}
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")
BUCKET_STRIDE = 16
VAE_CROP_MULTIPLE = 16
VIT_CROP_MULTIPLE = 28  # ViT patch 14 x merge 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLE_FPS = 12
MAX_SECONDS = 6.0
TEMPORAL_FACTOR = 4
FALLBACK_FPS = 24
# the largest frame accepted as input (every preset resizes to at most 1024 px per side; a larger source only
# costs memory: a 20000 x 20000 picture is 1.2 GB of RGB bytes and 9.6 GB as a float tensor)
MAX_FRAME_SIDE = 8192
MAX_FRAME_PIXELS = MAX_FRAME_SIDE * MAX_FRAME_SIDE

Frames = Union[np.ndarray, Image.Image, Sequence[Image.Image]]


def preset_sides(resolution: str) -> tuple[int, int]:
    """(VAE side, ViT side) of a resolution preset."""
    if resolution not in RESOLUTION_PRESETS:
        raise InputError(f"unknown resolution preset {resolution!r}; expected one of {sorted(RESOLUTION_PRESETS)}")
    return RESOLUTION_PRESETS[resolution]


# ---------------------------------------------------------------------------------------------- buckets

def _bucket_for_ratio(ratio_name: str, area: int) -> tuple[int, int]:
    w, h = (int(v) for v in ratio_name.split(":"))
    ratio = w / h
    # Python's round (half to even) on purpose: that is what the reference uses.
    width1 = round(math.sqrt(area * ratio) / BUCKET_STRIDE) * BUCKET_STRIDE
    height1 = round((width1 / ratio) / BUCKET_STRIDE) * BUCKET_STRIDE
    height2 = round(math.sqrt(area / ratio) / BUCKET_STRIDE) * BUCKET_STRIDE
    width2 = round((height2 * ratio) / BUCKET_STRIDE) * BUCKET_STRIDE
    miss1, miss2 = abs(width1 / height1 - ratio), abs(width2 / height2 - ratio)
    if miss1 < miss2 or (miss1 == miss2 and abs(width1 * height1 - area) <= abs(width2 * height2 - area)):
        return height1, width1
    return height2, width2


def bucket_sizes(side: int) -> list[tuple[int, int]]:
    """(H, W) buckets of area side**2 for the aspect ratios 21:9 .. 9:16, stride 16 (before any 28-crop)."""
    if side <= 0:
        raise InputError(f"bucket side must be positive, got {side}")
    return [_bucket_for_ratio(name, side * side) for name in ASPECT_RATIOS]


def pick_bucket(width: int, height: int, side: int) -> tuple[int, int]:
    """(H, W) of the bucket whose actual W/H is nearest to the input's (first one wins ties)."""
    if width <= 0 or height <= 0:
        raise InputError(f"media size must be positive, got {width}x{height}")
    buckets = bucket_sizes(side)
    ratio = width / height
    errors = [abs(ratio - w / h) for h, w in buckets]
    return buckets[errors.index(min(errors))]


def _ratio_crop_box(width: int, height: int, ratio: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the full-area crop of exact aspect `ratio`, as torchvision's
    RandomResizedCrop(scale=(1, 1), ratio=(r, r)) picks it; its rare random offset is replaced by the center."""
    area = width * height
    # torchvision draws the ratio as exp(float32 log r); keep that rounding so boundary cases agree.
    drawn_ratio = math.exp(torch.log(torch.tensor(ratio)).item())
    crop_w = int(round(math.sqrt(area * drawn_ratio)))
    crop_h = int(round(math.sqrt(area / drawn_ratio)))
    if not (0 < crop_w <= width and 0 < crop_h <= height):
        crop_w, crop_h = width, height
        if width / height < ratio:
            crop_h = int(round(width / ratio))
        elif width / height > ratio:
            crop_w = int(round(height * ratio))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


def _resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    height, width = bucket
    box = _ratio_crop_box(image.width, image.height, width / height)
    return np.asarray(image.crop(box).resize((width, height), resample=Image.BICUBIC), dtype=np.uint8)


def _center_crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Center crop [..., H, W] to multiples of `multiple` (torchvision's center_crop offsets: round half to even)."""
    height, width = pixels.shape[-2:]
    new_h, new_w = height - height % multiple, width - width % multiple
    top, left = int(round((height - new_h) / 2.0)), int(round((width - new_w) / 2.0))
    return pixels[..., top:top + new_h, left:left + new_w]


# ---------------------------------------------------------------------------------------------- loading

def check_frame_size(height: int, width: int, what: str) -> None:
    """Refuse a frame larger than MAX_FRAME_PIXELS before anything is decoded or converted."""
    if height * width > MAX_FRAME_PIXELS:
        raise InputError(f"{what} is {width}x{height} pixels; the largest accepted frame is {MAX_FRAME_PIXELS:,} "
                         f"pixels (e.g. {MAX_FRAME_SIDE}x{MAX_FRAME_SIDE}): downscale it first (Lance works at "
                         f"1024 px per side at most)")


def load_image(source: str | Path | Image.Image, what: str = "image") -> Image.Image:
    """Open an image as RGB; palette and RGBA images are composited over white (as the reference does)."""
    if isinstance(source, Image.Image):
        image = source
        check_frame_size(image.height, image.width, what)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            image = Image.open(path)   # reads the header only
            check_frame_size(image.height, image.width, f"{what} {path}")
            image.load()
        except Image.DecompressionBombError as exc:   # PIL's own limit, hit while reading the header
            raise InputError(f"{what} {path} is too large to open ({exc}); the largest accepted frame is "
                             f"{MAX_FRAME_PIXELS:,} pixels (e.g. {MAX_FRAME_SIDE}x{MAX_FRAME_SIDE}): downscale it "
                             f"first") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read {path} as an image: {exc}") from exc
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _check_frames_array(frames: np.ndarray, what: str) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"{what}: expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if 0 in frames.shape:
        raise InputError(f"{what}: video has no frames or an empty frame size {tuple(frames.shape)}")
    return frames


def _read_npz_video(path: Path) -> tuple[np.ndarray, int]:
    try:
        with np.load(path) as data:
            frames, fps = data["frames"], data["fps"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read {path} as a video archive with 'frames' and 'fps': {exc}") from exc
    return frames, int(round(float(fps)))


def _read_ffmpeg_video(path: Path) -> tuple[np.ndarray, int]:
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3) for buffer in reader]
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
        raise InputError(f"cannot decode video {path}: {exc}") from exc
    fps = meta.get("fps")
    fps = int(round(float(fps))) if fps and float(fps) > 0 else FALLBACK_FPS
    return (np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)), fps


def load_video(path: str | Path) -> tuple[np.ndarray, int]:
    """All frames of a video file (uint8 [T, H, W, 3]) and its rounded fps. `.npz` archives hold 'frames', 'fps'."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    frames, fps = _read_npz_video(path) if path.suffix.lower() == ".npz" else _read_ffmpeg_video(path)
    if fps <= 0:
        fps = FALLBACK_FPS
    return _check_frames_array(np.asarray(frames), f"video {path}"), fps


def sample_frame_indices(n_frames: int, fps: float, max_seconds: float = MAX_SECONDS,
                         sample_fps: int = SAMPLE_FPS, min_count: int = 1) -> list[int]:
    """Reference frame sampler: about `sample_fps` over at most `max_seconds`, a 4k+1 count, spread over the whole
    clip (long clips are subsampled, not truncated). At least `min_count` frames where the clip has them (a clip
    shorter than 1/12 s gives the reference no frame; an edit needs a whole video)."""
    if n_frames <= 0:
        raise InputError(f"video has no frames (n_frames={n_frames})")
    if not (fps > 0 and math.isfinite(fps)):
        raise InputError(f"video fps must be a positive finite number, got {fps}")
    wanted = int(round(min(n_frames / fps, max_seconds) * sample_fps))
    count = (wanted - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1  # largest 4k+1 <= wanted
    available = (n_frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
    count = max(count, min(min_count, available), 1)
    return np.linspace(0, n_frames - 1, count).astype(np.int64).tolist()


def frames_from_tensor(images: torch.Tensor, what: str = "image") -> np.ndarray:
    """ComfyUI IMAGE (float [T, H, W, 3] or [H, W, 3] in 0..1) -> uint8 [T, H, W, 3], rounded half up like PIL.
    `what` names the input in errors (start_image, video...)."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{what} must be a tensor [T, H, W, 3], got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise InputError(f"{what} must be [T, H, W, 3] (RGB), got shape {tuple(images.shape)}")
    if images.numel() == 0:
        raise InputError(f"{what} is empty (shape {tuple(images.shape)})")
    if images.is_complex() or images.dtype == torch.bool:
        raise InputError(f"{what} must be a real-valued tensor in 0..1, got dtype {images.dtype}")
    check_frame_size(images.shape[1], images.shape[2], what)
    values = images.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise InputError(f"{what} contains NaN or infinite values; expected finite values in 0..1")
    require_unit_range(values, what)
    return torch.floor(values.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------- pixel tensors

def _as_pil_frames(frames: Frames) -> list[Image.Image]:
    if isinstance(frames, Image.Image):
        return [load_image(frames)]
    if isinstance(frames, np.ndarray):
        return [Image.fromarray(frame, mode="RGB") for frame in _check_frames_array(frames, "frames")]
    frames = list(frames)
    if not frames or not all(isinstance(frame, Image.Image) for frame in frames):
        raise InputError("frames must be a uint8 array [T, H, W, 3], a PIL image or a non-empty list of PIL images")
    return [load_image(frame) for frame in frames]


def _bucketed_unit_pixels(frames: Frames, side: int) -> torch.Tensor:
    """Bucket-resized frames as float32 [T, 3, H, W] in [0, 1]."""
    images = _as_pil_frames(frames)
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise InputError(f"all frames must have the same size, got {sorted(sizes)}")
    width, height = images[0].size
    bucket = pick_bucket(width, height, side)
    resized = np.stack([_resize_to_bucket(image, bucket) for image in images])
    return torch.from_numpy(resized).permute(0, 3, 1, 2).to(torch.float32).div(255.0)


def _normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


def vae_pixels(frames: Frames, side: int) -> torch.Tensor:
    """Frames -> float32 [3, T, H, W] in [-1, 1] at the VAE bucket of area side**2."""
    pixels = _center_crop_to_multiple(_bucketed_unit_pixels(frames, side), VAE_CROP_MULTIPLE)
    return _normalize(pixels, (0.5,) * 3, (0.5,) * 3).permute(1, 0, 2, 3).contiguous()


def vit_pixels(frames: Frames, side: int) -> torch.Tensor:
    """Frames -> float32 [3, T', H', W'] CLIP-normalised, H' and W' multiples of 28, T' even (an odd count,
    e.g. a single image, gets its last frame repeated)."""
    pixels = _center_crop_to_multiple(_bucketed_unit_pixels(frames, side), VIT_CROP_MULTIPLE)
    pixels = _normalize(pixels, CLIP_MEAN, CLIP_STD)
    if pixels.shape[0] % 2:
        pixels = torch.cat([pixels, pixels[-1:]], dim=0)
    return pixels.permute(1, 0, 2, 3).contiguous()
