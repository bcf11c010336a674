"""Preprocessing: bucket tables (spec 8.9), frame sampler (9.1 / 15.14), and the fixtures' dropped pixel tensors."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lance_model.io import media
from lance_model.errors import InputError

REL_TOL = 1e-5


def _stats(pixels: torch.Tensor) -> dict:
    values = pixels.double()
    return {"sum": values.sum().item(), "abs_sum": values.abs().sum().item(), "std": values.std().item()}


def _assert_stats(pixels: torch.Tensor, expected: dict, what: str) -> None:
    assert list(pixels.shape) == expected["shape"], f"{what}: shape {list(pixels.shape)} != {expected['shape']}"
    for name, value in _stats(pixels).items():
        rel = abs(value - expected[name]) / abs(expected[name])
        print(f"[parity] {what} {name}: rel_err={rel:.2e}")
        assert rel <= REL_TOL, f"{what}: {name} {value} vs fixture {expected[name]} (rel {rel:.2e})"


@pytest.fixture(scope="module")
def inputs(golden):
    image = media.load_image(golden.root / "inputs" / "image.png")
    video, fps = media.load_video(golden.root / "inputs" / "video.npz")
    return {"image": image, "video": video, "fps": fps}


# ------------------------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("side, table", [
    (768, [(496, 1152), (576, 1024), (672, 896), (768, 768), (896, 672), (1024, 576)]),
    (640, [(416, 976), (480, 848), (560, 752), (640, 640), (752, 560), (848, 480)]),
    (480, [(320, 752), (352, 624), (416, 560), (480, 480), (560, 416), (624, 352)]),
])
def test_vae_bucket_tables(side, table):
    assert media.bucket_sizes(side) == table


@pytest.mark.parametrize("side, table", [
    (672, [(420, 1008), (504, 896), (560, 756), (672, 672), (756, 560), (896, 504)]),
    (616, [(392, 924), (448, 812), (504, 700), (588, 588), (700, 504), (812, 448)]),
])
def test_vit_sizes_after_28_crop(side, table):
    cropped = [(h - h % 28, w - w % 28) for h, w in media.bucket_sizes(side)]
    assert cropped == table
    # and through the real pipeline, one aspect at a time
    for (height, width), (crop_h, crop_w) in zip(media.bucket_sizes(side), table):
        image = Image.new("RGB", (width, height), (10, 20, 30))
        assert tuple(media.vit_pixels(image, side).shape) == (3, 2, crop_h, crop_w)


def test_pick_bucket_nearest_actual_ratio():
    assert media.pick_bucket(1920, 1080, 640) == (480, 848)
    assert media.pick_bucket(1080, 1920, 640) == (848, 480)
    assert media.pick_bucket(64, 64, 256) == (256, 256)
    assert media.pick_bucket(3000, 1000, 768) == (496, 1152)  # wider than 21:9 still picks 21:9
    assert media.pick_bucket(1000, 1000 * 4 // 3, 640) == (752, 560)


def test_presets():
    assert media.preset_sides("video_480p") == (640, 616)
    assert media.preset_sides("image_768res") == (768, 672)
    assert media.preset_sides("video_192p") == media.preset_sides("image_256res") == (256, 224)
    with pytest.raises(InputError, match="unknown resolution"):
        media.preset_sides("1080p")


def test_crop_then_resize_keeps_center():
    # A 2:1 image with a marker column in the middle maps onto the 16:9 bucket with the marker centred.
    frame = np.zeros((90, 180, 3), np.uint8)
    frame[:, 88:92] = 255
    pixels = media.vae_pixels(frame[None], 256)
    assert tuple(pixels.shape[-2:]) == media.pick_bucket(180, 90, 256)
    bright_columns = torch.nonzero(pixels[0, 0].mean(dim=0) > 0).flatten().double()
    assert abs(bright_columns.mean().item() - (pixels.shape[-1] - 1) / 2) <= 1.0


# ------------------------------------------------------------------------------------------- frame sampler

def test_frame_sampler_examples():
    indices = media.sample_frame_indices(300, 30)
    assert len(indices) == 69 and indices[0] == 0 and indices[-1] == 299
    assert indices == sorted(indices)
    assert len(media.sample_frame_indices(48, 24)) == 21
    assert media.sample_frame_indices(1, 30) == [0]


def test_frame_sampler_parity_fixture_indices(golden, inputs):
    expected = golden.hyper("video_edit")["video_frame_indices_read"]
    assert media.sample_frame_indices(len(inputs["video"]), inputs["fps"]) == expected
    assert golden.hyper("x2t_video")["video_frame_indices_read"] == expected


def test_frame_sampler_counts_are_4k_plus_1():
    for n_frames, fps in [(10, 30), (100, 25), (1000, 60), (37, 12), (7, 2)]:
        count = len(media.sample_frame_indices(n_frames, fps))
        expected = (int(round(min(n_frames / fps, 6.0) * 12)) - 1) // 4 * 4 + 1
        assert count == max(expected, 1) and (count - 1) % 4 == 0


def test_frame_sampler_rejects_empty():
    with pytest.raises(InputError):
        media.sample_frame_indices(0, 30)
    with pytest.raises(InputError):
        media.sample_frame_indices(10, 0)


# ------------------------------------------------------------------------------------------- pixel parity

@pytest.mark.parametrize("fixture, key, source, branch", [
    ("image_edit", "packed/vae_video_tensors.0", "image", "vae"),
    ("video_edit", "packed/vae_video_tensors.0", "video", "vae"),
    ("x2t_image", "packed/vit_video_tensors.0", "image", "vit"),
    ("image_edit", "packed/vit_video_tensors.0", "image", "vit"),
    ("x2t_video", "packed/vit_video_tensors.0", "video", "vit"),
    ("video_edit", "packed/vit_video_tensors.0", "video", "vit"),
])
def test_pixel_statistics_parity(golden, inputs, fixture, key, source, branch):
    vae_side, vit_side = media.preset_sides(golden.hyper(fixture)["resolution"])
    frames = inputs[source]
    pixels = media.vae_pixels(frames, vae_side) if branch == "vae" else media.vit_pixels(frames, vit_side)
    assert pixels.dtype == torch.float32
    _assert_stats(pixels, golden.fixture(fixture)["dropped_large_intermediates"][key], f"{fixture} {key}")


def test_i2v_dummy_video_statistics_parity(golden, inputs):
    # The reference's i2v condition video = the image repeated over frames 0-3 + unseeded Gaussian frames, so only
    # the image part can be reproduced: the remainder must look like one frame of N(0, 1) noise.
    expected = golden.fixture("i2v")["dropped_large_intermediates"]["packed/vae_video_tensors.0"]
    image = media.vae_pixels(inputs["image"], media.preset_sides("video_192p")[0])
    noise_values = math.prod(expected["shape"]) - 4 * image.numel()
    remainder_sum = expected["sum"] - 4 * image.double().sum().item()
    remainder_abs = expected["abs_sum"] - 4 * image.double().abs().sum().item()
    print(f"[parity] i2v noise frame: mean={remainder_sum / noise_values:.2e} "
          f"mean_abs={remainder_abs / noise_values:.4f} (N(0,1): 0, {math.sqrt(2 / math.pi):.4f})")
    assert abs(remainder_sum) < 5 * math.sqrt(noise_values)
    assert abs(remainder_abs / noise_values - math.sqrt(2 / math.pi)) < 0.01


def test_vit_pixels_even_frames(inputs):
    image_pixels = media.vit_pixels(inputs["image"], 224)
    assert image_pixels.shape[1] == 2 and torch.equal(image_pixels[:, 0], image_pixels[:, 1])
    video_pixels = media.vit_pixels(inputs["video"], 224)
    assert video_pixels.shape[1] == 6 and torch.equal(video_pixels[:, 4], video_pixels[:, 5])
    assert media.vae_pixels(inputs["video"], 256).shape[1] == 5


def test_vae_pixels_range(inputs):
    pixels = media.vae_pixels(inputs["image"], 256)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


# ------------------------------------------------------------------------------------------- loading

def test_load_image_composites_alpha_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    image = media.load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert media.load_image(palette).getpixel((2, 2)) == (10, 20, 30)


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        media.load_image(tmp_path / "missing.png")
    bogus = tmp_path / "not_an_image.png"
    bogus.write_bytes(b"this is text, not a PNG")
    with pytest.raises(InputError, match="not_an_image.png"):
        media.load_image(bogus)


def test_load_video_npz(golden, inputs):
    assert inputs["video"].shape == (5, 64, 64, 3) and inputs["video"].dtype == np.uint8 and inputs["fps"] == 12


def test_load_video_mp4_roundtrip(tmp_path):
    import imageio_ffmpeg

    path = tmp_path / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (32, 32), fps=24, macro_block_size=16)
    writer.send(None)
    for value in range(0, 240, 30):
        writer.send(np.full((32, 32, 3), value, np.uint8))
    writer.close()
    frames, fps = media.load_video(path)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8 and fps == 24
    assert abs(int(frames[-1].mean()) - 210) < 8  # lossy codec, but the content is there


def test_load_video_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        media.load_video(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.npz"
    np.savez(empty, frames=np.zeros((0, 8, 8, 3), np.uint8), fps=np.int64(12))
    with pytest.raises(InputError, match="no frames"):
        media.load_video(empty)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="corrupt.mp4"):
        media.load_video(corrupt)


def test_frames_from_tensor_roundtrip_and_errors():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    as_float = torch.from_numpy(frames).float() / 255.0
    assert np.array_equal(media.frames_from_tensor(as_float), frames)
    assert media.frames_from_tensor(as_float[0]).shape == (1, 5, 7, 3)
    assert media.frames_from_tensor(torch.tensor([[[[0.5 / 255, 1.5, -0.2]]]])).tolist() == [[[[1, 255, 0]]]]
    with pytest.raises(InputError, match="RGB"):
        media.frames_from_tensor(torch.zeros(1, 4, 4, 4))
    with pytest.raises(InputError, match="T, H, W, 3"):
        media.frames_from_tensor(torch.zeros(4, 4))
    with pytest.raises(InputError, match="NaN"):
        media.frames_from_tensor(torch.full((1, 2, 2, 3), float("nan")))
    with pytest.raises(InputError, match="empty"):
        media.frames_from_tensor(torch.zeros(0, 4, 4, 3))
    with pytest.raises(InputError):
        media.frames_from_tensor(np.zeros((1, 2, 2, 3)))


def test_pixel_functions_reject_bad_frames():
    with pytest.raises(InputError):
        media.vae_pixels(np.zeros((2, 8, 8), np.uint8), 256)
    with pytest.raises(InputError):
        media.vit_pixels([], 224)
    with pytest.raises(InputError, match="same size"):
        media.vae_pixels([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))], 256)
