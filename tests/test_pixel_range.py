"""Pixels outside 0..1 (issue 27): data of another scale (0..255, garbage) is refused by the library and the
nodes, naming the input; the overshoot of ordinary resampling is not (core's bicubic Upscale Image does not clamp)."""
from __future__ import annotations

import pytest
import torch

from lance_model import InputError
from lance_model.io.media import frames_from_tensor

S = 64


def bicubic_upscaled(comfy) -> torch.Tensor:
    """A sharp-edged image through core's Upscale Image (bicubic): values overshoot 0..1."""
    import nodes as core_nodes
    edges = torch.randint(0, 2, (1, S // 2, S // 2, 1), generator=torch.Generator().manual_seed(0)).float()
    (image,) = core_nodes.ImageScale().upscale(edges.expand(1, S // 2, S // 2, 3), "bicubic", S, S, "disabled")
    assert image.min() < -0.1 and image.max() > 1.1
    return image


def test_the_library_clamps_an_overshoot_and_refuses_another_scale():
    overshoot = torch.tensor([-0.3, 0.5, 1.3]).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    assert frames_from_tensor(overshoot).reshape(-1).tolist() == [0] * 3 + [128] * 3 + [255] * 3
    with pytest.raises(InputError, match=r"^start_image has pixel values from 0 to 200; expected values in 0\.\.1 "
                                         r"\(0\.\.255 data\? divide it by 255\)"):
        frames_from_tensor(torch.tensor([0.0, 200.0]).view(1, 1, 2, 1).expand(1, 1, 2, 3), "start_image")
    with pytest.raises(InputError, match=r"^image has pixel values from -3 to 0\.5;.*\(check what produced it\)"):
        frames_from_tensor(torch.tensor([-3.0, 0.5]).view(1, 1, 2, 1).expand(1, 1, 2, 3))


def test_encode_raw_latents_takes_an_overshoot(pipe):
    frames = torch.rand(1, S, S, 3, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.3
    assert pipe.encode_raw_latents(frames).shape[:2] == (1, pipe.vae.z_dim)


def test_nodes_take_an_image_from_core_bicubic_upscale(comfy, nodes, tiny_model):
    import nodes as core_nodes

    from lance_nodes.native_vae import LanceCoreVAE
    image = bicubic_upscaled(comfy)
    (latent,) = core_nodes.VAEEncode().encode(LanceCoreVAE(tiny_model), image)
    assert latent["samples"].shape[1] == tiny_model.pipe.vae.z_dim
    result = nodes.LanceEdit.execute(tiny_model, image, "make it red", "image_256res",
                                     steps=1, shift=3.5, cfg_scale=4.0, cfg_interval_start=0.4, cfg_interval_end=1.0,
                                     cfg_renorm="global", cfg_renorm_min=0.0, seed=1, batch_size=1)
    assert torch.isfinite(result.args[1]).all()
