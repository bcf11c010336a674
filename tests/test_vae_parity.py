"""Wan2.2 VAE (diffusers AutoencoderKLWan + Wan-native key conversion) against the golden fixtures."""
import pytest
import torch
from diffusers import AutoencoderKLWan

from lance_model.io import media
from lance_model.nn.checkpoint import load_torch_state_dict
from lance_model.errors import CheckpointError, InputError
from lance_model.nn.vae import WAN22_LATENT_STATS, LanceVAE, convert_wan_vae_keys, load_vae
from tests.helpers import assert_close

# where a fixture stores its decoded pixels as float16 the manifest allows 2e-3 instead of 1e-3
FLOAT16_DECODE_TOL = 2e-3


def _channels_first(latent_thwc: torch.Tensor) -> torch.Tensor:
    """Fixture latents [t, h, w, 48] -> [1, 48, t, h, w]."""
    return latent_thwc.permute(3, 0, 1, 2).unsqueeze(0)


@pytest.fixture(scope="module")
def vae_path(golden):
    return golden.checkpoint / "Wan2.2_VAE.pth"


@pytest.fixture(scope="module")
def vae(vae_path) -> LanceVAE:
    return load_vae(vae_path, torch.float32, "cpu")


# ------------------------------------------------------------------------------------------- encode

@pytest.mark.parametrize("task", ["image_edit", "video_edit", "i2v"])
def test_encode_parity(golden, vae, task):
    vae_side, _ = media.preset_sides(golden.hyper(task)["resolution"])
    pixels = media.vae_pixels(golden.input_media(task), vae_side).unsqueeze(0)
    mu, logvar = vae.encode(pixels)
    expected_mu = _channels_first(golden.tensors(task)["vae_encode/mu.0"])
    expected_logvar = _channels_first(golden.tensors(task)["vae_encode/log_var.0"])
    if task == "i2v":
        # The reference encodes a dummy video (image in frames 0-3, unseeded noise after) and keeps latent frame 0;
        # the VAE is causal, so frame 0 equals the image encoded alone. Later latent frames hold the noise: skip.
        assert mu.shape[2] == 1
        expected_mu, expected_logvar = expected_mu[:, :, :1], expected_logvar[:, :, :1]
    # `vae_encode/mu.1` of the edit fixtures is the encoding of a random placeholder target video drawn from the
    # unseeded global RNG (the reference discards it), so it cannot be reproduced and is not tested.
    assert_close(mu, expected_mu, golden.tolerance("vae_encode/mu.0"), f"{task} vae_encode/mu.0")
    assert_close(logvar, expected_logvar, golden.tolerance("vae_encode/log_var.0"), f"{task} vae_encode/log_var.0")


@pytest.mark.parametrize("task", ["image_edit", "video_edit"])
def test_pipeline_raw_latent_encode_is_the_official_posterior_mean(golden, pipe, task):
    """encode_raw_latents (what core VAEEncode runs through Lance Model's VAE) on the official VAE pixels gives the
    official mu, un-normalized; decode_raw_latents takes it back to frames of the same size."""
    vae_side, _ = media.preset_sides(golden.hyper(task)["resolution"])
    pixels = media.vae_pixels(golden.input_media(task), vae_side)
    frames = ((pixels + 1) / 2).permute(1, 2, 3, 0)
    raw = pipe.encode_raw_latents(frames)
    expected_mu = _channels_first(golden.tensors(task)["vae_encode/mu.0"])
    assert_close(pipe.vae.normalize(raw), expected_mu, golden.tolerance("vae_encode/mu.0"), f"{task} raw encode")
    decoded = pipe.decode_raw_latents(raw)
    assert decoded.shape == (1, *frames.shape)


# ------------------------------------------------------------------------------------------- decode

TARGET_LATENT = {"t2i": "out/latent.0", "t2v": "out/latent.0", "i2v": "out/latent.0",
                 "image_edit": "out/latent.1", "video_edit": "out/latent.1"}


@pytest.mark.parametrize("task", list(TARGET_LATENT))
def test_decode_parity(golden, vae, task):
    tensors = golden.tensors(task)
    pixels = vae.decode(_channels_first(tensors[TARGET_LATENT[task]]))
    expected = tensors["out/decoded.0"]
    tol = FLOAT16_DECODE_TOL if expected.dtype == torch.float16 else golden.tolerance("out/decoded.0")
    assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
    assert_close(pixels[0], expected.float(), tol, f"{task} out/decoded.0")
    if "out/decoded_uint8_thwc" in tensors:
        as_uint8 = torch.round((pixels[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
        assert_close(as_uint8, tensors["out/decoded_uint8_thwc"], golden.tolerance("out/decoded_uint8_thwc"),
                     f"{task} out/decoded_uint8_thwc")


def test_encode_decode_shapes(vae):
    pixels = torch.rand(1, 3, 17, 32, 48) * 2 - 1
    mu, logvar = vae.encode(pixels)
    assert mu.shape == logvar.shape == (1, 48, 5, 2, 3)
    assert vae.decode(mu).shape == (1, 3, 17, 32, 48)


# ------------------------------------------------------------------------------------------- weights

def test_key_conversion_is_strict_and_complete(vae_path, vae):
    native = load_torch_state_dict(vae_path)
    converted = convert_wan_vae_keys(native)
    module_keys = set(vae.module.state_dict())
    assert len(converted) == len(native)
    assert set(converted) == module_keys  # every key used, none missing
    assert converted["quant_conv.weight"] is native["conv1.weight"]
    assert converted["encoder.down_blocks.1.downsampler.time_conv.bias"] is \
        native["encoder.downsamples.1.downsamples.2.time_conv.bias"]
    assert converted["decoder.up_blocks.1.upsampler.resample.1.weight"] is \
        native["decoder.upsamples.1.upsamples.3.resample.1.weight"]
    assert converted["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] is \
        native["encoder.downsamples.1.downsamples.0.shortcut.weight"]
    assert converted["decoder.up_blocks.0.resnets.2.norm2.gamma"] is \
        native["decoder.upsamples.0.upsamples.2.residual.3.gamma"]
    assert converted["encoder.mid_block.attentions.0.to_qkv.weight"] is native["encoder.middle.1.to_qkv.weight"]
    assert converted["decoder.norm_out.gamma"] is native["decoder.head.0.gamma"]
    for key, tensor in vae.module.state_dict().items():
        assert torch.equal(tensor, converted[key]), key


def test_architecture_read_from_weights(vae):
    config = vae.module.config
    assert (config.base_dim, config.decoder_base_dim, config.z_dim) == (4, 4, 48)  # tiny fixture sizes
    assert (vae.z_dim, vae.spatial_factor, vae.temporal_factor) == (48, 16, 4)
    assert (vae.dtype, vae.device.type) == (torch.float32, "cpu")
    assert isinstance(vae.module, AutoencoderKLWan)


def test_load_casts_to_dtype(vae_path):
    bf16 = load_vae(vae_path, torch.bfloat16, "cpu")
    assert bf16.dtype == torch.bfloat16
    mu, _ = bf16.encode(torch.zeros(1, 3, 1, 32, 32))
    assert mu.dtype == torch.float32 and mu.shape == (1, 48, 1, 2, 2)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "Wan2.2_VAE.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch pickle" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_vae(corrupt)


def test_state_mismatch_names_key_and_shapes(vae_path, tmp_path):
    native = dict(load_torch_state_dict(vae_path))
    missing = dict(native)
    missing.pop("decoder.middle.1.proj.bias")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"decoder\.mid_block\.attentions\.0\.proj\.bias"):
        load_vae(tmp_path / "missing.pth")
    reshaped = dict(native)
    reshaped["encoder.middle.1.proj.bias"] = torch.zeros(5)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointError, match=r"encoder\.mid_block\.attentions\.0\.proj\.bias.*\(16,\).*\(5,\)"):
        load_vae(tmp_path / "reshaped.pth")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Wan2.2 VAE"):
        load_vae(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------- behaviour

def test_tiling_is_opt_in(golden, vae):
    assert not vae.tiling_enabled and not vae.module.use_tiling
    latent = _channels_first(golden.tensors("image_edit")["out/latent.1"])
    plain = vae.decode(latent)
    vae.enable_tiling(128, 128, 96, 96)
    try:
        assert vae.tiling_enabled
        tiled = vae.decode(latent)
    finally:
        vae.disable_tiling()
    assert not vae.tiling_enabled
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, plain)  # tiling changes pixels: that is why it stays off by default


def test_normalisation_constants_and_roundtrip(vae):
    assert len(WAN22_LATENT_STATS["mean"]) == len(WAN22_LATENT_STATS["std"]) == 48
    assert WAN22_LATENT_STATS["mean"][:2] == (-0.2289, -0.0052) and WAN22_LATENT_STATS["std"][-1] == 0.7744
    mu = torch.randn(1, 48, 2, 3, 3)
    z = vae.normalize(mu)
    assert torch.allclose(z[0, 0], (mu[0, 0] + 0.2289) / 0.4765)
    assert torch.allclose(vae.denormalize(z), mu, atol=1e-6)


def test_sample_posterior_reference_quirk(vae):
    mu = torch.randn(1, 48, 1, 2, 2)
    logvar = torch.randn(1, 48, 1, 2, 2)
    sample = vae.sample_posterior(mu, logvar, torch.Generator("cpu").manual_seed(7))
    noise = torch.randn(mu.shape, generator=torch.Generator("cpu").manual_seed(7))
    # noise added in normalised space, scaled by the *raw* std (not divided by the Wan2.2 std)
    assert torch.allclose(sample, mu + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(sample, vae.sample_posterior(mu, logvar, torch.Generator("cpu").manual_seed(7)))
    with pytest.raises(InputError):
        vae.sample_posterior(mu, logvar[:, :, :, :1])


def test_bad_input_shapes(vae):
    with pytest.raises(InputError, match="B, 3, T, H, W"):
        vae.encode(torch.zeros(3, 1, 32, 32))
    with pytest.raises(InputError, match="B, 3, T, H, W"):
        vae.encode(torch.zeros(1, 4, 1, 32, 32))
    with pytest.raises(InputError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(InputError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 1, 40, 32))
    with pytest.raises(InputError, match="48"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(InputError, match="48"):
        vae.decode(torch.zeros(48, 1, 2, 2))


def test_pipeline_vae_tiling_is_opt_in(golden):
    from lance_model import load_lance

    assert not load_lance(golden.checkpoint, device="cpu").vae.tiling_enabled
    assert load_lance(golden.checkpoint, device="cpu", vae_tiling=True).vae.tiling_enabled
