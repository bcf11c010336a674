"""Image CFG for edits (library): v = v_uu + g_t (v_c - v_u) + g_v (v_u - v_uu), where v_uu is the uncond
branch without the ViT/source media. Off at g_v = 1 (the official guidance, bit for bit); the official code's
own path for it is broken, so these tests check the algebra and what each branch sees, not a fixture."""
import pytest
import torch

from lance_model import InputError
from lance_model.pipeline import GenerationSettings
from tests.helpers import assert_close

INSTRUCTION = "make the sky red"
STEPS = 3


def edit_request(pipe, image, instruction=INSTRUCTION, negative_prompt=""):
    settings = GenerationSettings(steps=STEPS, decode=False, seed=7)
    inputs = pipe.prepare_edit(image, instruction, video=False, resolution="image_256res", settings=settings,
                               negative_prompt=negative_prompt)
    return inputs, settings


def run_steps(pipe, inputs, settings, **options):
    """Final latents and every step's StepInfo."""
    infos = []
    for key, value in options.items():
        setattr(settings, key, value)
    latents = pipe.generate("image_edit", INSTRUCTION, inputs, settings, observer=infos.append).latents
    return latents, infos


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


def test_image_cfg_scale_one_is_the_official_guidance(pipe, image):
    inputs, settings = edit_request(pipe, image)
    plain, plain_infos = run_steps(pipe, inputs, settings)
    inputs, settings = edit_request(pipe, image)
    one, one_infos = run_steps(pipe, inputs, settings, image_cfg_scale=1.0)
    assert torch.equal(plain, one)
    assert all(info.v_image_uncond is None for info in one_infos)


@pytest.mark.parametrize("renorm", ["global", "none"])
def test_image_cfg_combines_the_three_branches(pipe, image, renorm):
    inputs, settings = edit_request(pipe, image)
    g_t, g_v = 3.0, 1.7
    _, infos = run_steps(pipe, inputs, settings, cfg_scale=g_t, image_cfg_scale=g_v, cfg_renorm=renorm)
    guided = [info for info in infos if info.v_uncond is not None]
    assert guided, "no step ran inside the guidance interval"
    for info in infos:
        assert (info.v_image_uncond is None) == (info.v_uncond is None)
    for info in guided:
        v_c, v_u, v_uu = info.v_cond, info.v_uncond, info.v_image_uncond
        expected = v_uu + g_t * (v_c - v_u) + g_v * (v_u - v_uu)
        if renorm == "global":
            ratio = v_c.norm(dim=(1, 2), keepdim=True) / (expected.norm(dim=(1, 2), keepdim=True) + 1e-8)
            expected = expected * ratio.clamp(max=1.0)
        assert_close(info.v, expected, 1e-5, f"step {info.step}: guided velocity")
        assert (v_u - v_uu).abs().max() > 1e-4, "the image branch should differ from the uncond branch"


def step0_image_uncond(pipe, image, instruction, negative_prompt=""):
    inputs, settings = edit_request(pipe, image, instruction, negative_prompt)
    _, infos = run_steps(pipe, inputs, settings, image_cfg_scale=1.5)
    return infos[0]


def test_image_uncond_branch_sees_neither_media_nor_instruction(pipe, image):
    other_image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    a = step0_image_uncond(pipe, image, INSTRUCTION)
    b = step0_image_uncond(pipe, other_image, "turn it into winter")
    assert_close(a.v_image_uncond, b.v_image_uncond, 1e-6, "v_uu across source images and instructions")
    assert (a.v_uncond - b.v_uncond).abs().max() > 1e-4, "v_u should see the source image"


def test_image_uncond_keeps_the_negative_prompt(pipe, image):
    other_image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    plain = step0_image_uncond(pipe, image, INSTRUCTION)
    negative = step0_image_uncond(pipe, image, INSTRUCTION, negative_prompt="blurry")
    negative_other = step0_image_uncond(pipe, other_image, INSTRUCTION, negative_prompt="blurry")
    assert (plain.v_image_uncond - negative.v_image_uncond).abs().max() > 1e-4
    assert_close(negative.v_image_uncond, negative_other.v_image_uncond, 1e-6, "v_uu with a negative prompt")


def test_batched_and_sequential_branches_agree(pipe, image):
    results = []
    for batched in (True, False):
        inputs, settings = edit_request(pipe, image)
        results.append(run_steps(pipe, inputs, settings, image_cfg_scale=1.5, batched_cfg=batched)[0])
    assert_close(results[0], results[1], 1e-5, "batched vs sequential image CFG")


def test_image_cfg_needs_an_edit(pipe, golden):
    hp = golden.hyper("t2i")
    with pytest.raises(InputError, match="image_cfg_scale"):
        pipe.text_to_image(hp["caption"], width=hp["video_width"], height=hp["video_height"], steps=1,
                           image_cfg_scale=1.5, decode=False)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), "2"])
def test_image_cfg_scale_is_checked(pipe, image, bad):
    with pytest.raises(InputError, match="image_cfg_scale"):
        pipe.edit_image(image, INSTRUCTION, resolution="image_256res", steps=1, image_cfg_scale=bad, decode=False)
