"""Lance Model's VAE output: the loaded release's Wan2.2 VAE as a core VAE. Core VAEDecode / VAEEncode (and the
tiled variants) run through the library on the same weights, so native workflows need nothing beyond models/lance."""

import pytest
import torch

from tests.helpers import golden_image, golden_video, sampling_widgets

S = 128  # tiny sizes
GEN = sampling_widgets(steps=2, seed=42)


@pytest.fixture(scope="module")
def core_vae(comfy, tiny_model):
    from lance_nodes import native_nodes
    return native_nodes.LanceModelNode.execute(tiny_model).args[1]


def test_core_vae_is_the_release_vae_not_a_copy(core_vae, tiny_model):
    import comfy.sd
    pipe = tiny_model.pipe
    assert isinstance(core_vae, comfy.sd.VAE)
    assert core_vae.first_stage_model is pipe.session.vae_module
    assert core_vae.patcher is tiny_model.patcher          # the release's one patcher
    module_ptrs = {p.data_ptr() for p in pipe.session.vae_module.parameters()}
    assert {t.data_ptr() for t in core_vae.get_sd().values() if t.is_floating_point()} <= module_ptrs | {
        b.data_ptr() for b in pipe.session.vae_module.buffers()}
    assert core_vae.latent_channels == pipe.vae.z_dim
    assert core_vae.spacial_compression_decode() == core_vae.spacial_compression_encode() == pipe.vae.spatial_factor
    assert core_vae.temporal_compression_decode() == pipe.vae.temporal_factor


@pytest.mark.parametrize("kind", ["image", "video"])
def test_core_vae_decode_is_lance_decode(core_vae, nodes, tiny_model, kind):
    import nodes as core_nodes
    if kind == "image":
        latent = nodes.LanceT2I.execute(tiny_model, prompt="a red cat", width=S, height=S, **GEN).args[0]
    else:
        frames = 1 + tiny_model.pipe.vae.temporal_factor          # the smallest video: two latent frames
        latent = nodes.LanceT2V.execute(tiny_model, "a boat", S, S, frames, "video_192p", 8.0, **GEN).args[0]
    (decoded,) = core_nodes.VAEDecode().decode(core_vae, latent)
    (lance,) = nodes.LanceDecode.execute(tiny_model, latent).args
    assert decoded.shape == lance.shape == ((1 if kind == "image" else frames), S, S, 3)
    assert torch.equal(decoded, lance)
    (tiled,) = core_nodes.VAEDecodeTiled().decode(core_vae, latent, 256, 64, 64, 8)
    expected = tiny_model.pipe.decode_raw_latents(latent["samples"], tiled=True)
    assert torch.equal(tiled, expected.reshape(tiled.shape))


def test_core_vae_encode_is_the_posterior_mean(core_vae, tiny_model):
    import nodes as core_nodes
    pipe = tiny_model.pipe
    image = golden_image()
    (latent,) = core_nodes.VAEEncode().encode(core_vae, image)
    side = pipe.vae.spatial_factor
    h, w = image.shape[1] // side * side, image.shape[2] // side * side
    assert latent["samples"].shape == (1, pipe.vae.z_dim, 1, h // side, w // side)
    top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2     # core's crop: centered, offset floored
    pixels = image[0, top:top + h, left:left + w].permute(2, 0, 1)[:, None] * 2 - 1
    mu, _ = pipe.vae.encode(pixels[None])
    expected = pipe.vae.denormalize(mu).cpu()
    err = (latent["samples"] - expected).abs().max().item()
    print(f"[native] core VAEEncode vs the library's posterior mean: max_abs={err:.2e}")
    assert err < 1e-5
    (decoded,) = core_nodes.VAEDecode().decode(core_vae, latent)
    assert decoded.shape == (1, h, w, 3)


def test_core_vae_encode_trims_a_video_as_core_does(core_vae, tiny_model):
    """Core's Wan2.2 VAE encodes the first 4k+1 frames, center-cropped to whole latent cells."""
    import nodes as core_nodes
    pipe = tiny_model.pipe
    frames = golden_video()
    step, side = pipe.vae.temporal_factor, pipe.vae.spatial_factor
    extra = torch.cat([frames, frames[:step - 1]])                    # 4k+1 + (step-1) frames
    padded = torch.nn.functional.pad(extra.permute(0, 3, 1, 2), (3, 4, 2, 5), mode="replicate").permute(0, 2, 3, 1)
    (latent,) = core_nodes.VAEEncode().encode(core_vae, padded)
    (plain,) = core_nodes.VAEEncode().encode(core_vae, frames[:(len(frames) - 1) // step * step + 1])
    assert latent["samples"].shape == plain["samples"].shape
    assert latent["samples"].shape[2] == (len(frames) - 1) // step + 1
    h, w = frames.shape[1] // side, frames.shape[2] // side
    assert latent["samples"].shape[3:] == (h, w)


def test_core_vae_refuses_other_latents_and_images_clearly(core_vae):
    import nodes as core_nodes

    from lance_nodes.errors import InputError
    with pytest.raises(InputError, match="samples: LATENT has shape .*4 channels.*Wan2.2"):
        core_nodes.VAEDecode().decode(core_vae, {"samples": torch.zeros(1, 4, 16, 16)})
    with pytest.raises(InputError, match="pixels"):
        core_nodes.VAEEncode().encode(core_vae, torch.zeros(1, 8, 8, 3))   # smaller than one latent cell
    with pytest.raises(InputError, match="pixels.*NaN"):
        core_nodes.VAEEncode().encode(core_vae, torch.full((1, 32, 32, 3), float("nan")))


def test_core_vae_decode_is_interruptible_and_the_model_stays_usable(core_vae, nodes, tiny_model):
    import comfy.model_management as mm
    import nodes as core_nodes
    latent = nodes.LanceT2I.execute(tiny_model, prompt="a red cat", width=S, height=S, **GEN).args[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            core_nodes.VAEDecode().decode(core_vae, latent)
    finally:
        mm.interrupt_current_processing(False)
    (decoded,) = core_nodes.VAEDecode().decode(core_vae, latent)
    assert decoded.shape == (1, S, S, 3)
