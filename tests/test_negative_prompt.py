"""Negative prompts in the library: the uncond branch runs the negative prompt's tokens in the caption's place.
An empty negative prompt is the official caption-dropped branch (parity unchanged)."""
import pytest
import torch

from lance_model import InputError
from tests.helpers import assert_close, prepare, settings_for

NEGATIVE = "blurry, low quality"


def step0(pipe, name, inputs, settings):
    captured = {}

    def observer(info):
        if info.step == 0:
            captured.update(cond=info.v_cond.clone(), uncond=info.v_uncond.clone())
    latents = pipe.generate(name, "x", inputs, settings, observer=observer).latents
    return latents, captured


def test_empty_negative_prompt_is_the_official_uncond(pipe, golden):
    hp = golden.hyper("t2i")
    kwargs = dict(width=hp["video_width"], height=hp["video_height"], steps=2, decode=False)
    plain = pipe.text_to_image(hp["caption"], **kwargs).latents
    for empty in ("", "   "):
        assert torch.equal(pipe.text_to_image(hp["caption"], negative_prompt=empty, **kwargs).latents, plain)


@pytest.mark.parametrize("name", ["t2i", "image_edit"])
def test_negative_prompt_is_the_uncond_branch(pipe, golden, name):
    """With a negative prompt N, the step-0 uncond velocity is the cond velocity of the same request with N as
    its prompt; and the result differs from the caption-dropped uncond."""
    if name not in golden.manifest["fixtures"]:
        pytest.skip(f"{name} not in this fixture set")
    settings = settings_for(golden, name, decode=False)
    plain_inputs = prepare(pipe, golden, name, settings)
    with_negative = prepare_with(pipe, golden, name, settings, negative_prompt=NEGATIVE)
    as_prompt = prepare_with(pipe, golden, name, settings, prompt=NEGATIVE)
    assert torch.equal(with_negative.negative_seq.ids, as_prompt.seq.ids)
    plain, _ = step0(pipe, name, plain_inputs, settings)
    negative, captured = step0(pipe, name, with_negative, settings)
    _, reference = step0(pipe, name, as_prompt, settings)
    assert_close(captured["uncond"], reference["cond"], 1e-6, f"{name}: uncond with a negative prompt")
    assert (negative - plain).abs().max() > 1e-3


def prepare_with(pipe, golden, name, settings, prompt=None, negative_prompt=""):
    """The fixture's request (as tests/helpers.prepare) with another prompt and/or a negative prompt."""
    hp = dict(golden.hyper(name))
    inputs = prepare(pipe, golden, name, settings)
    caption = prompt or hp["caption"]
    if name == "t2i":
        fresh = pipe.prepare_text_to_image(caption, hp["video_width"], hp["video_height"], negative_prompt=negative_prompt)
    else:
        fresh = pipe.prepare_edit(golden.input_media(name), caption, video=name == "video_edit",
                                  resolution=hp["resolution"], settings=settings, negative_prompt=negative_prompt)
        fresh.source_latents = inputs.source_latents  # the fixture's condition latents, as prepare() injects
    return fresh


def test_negative_prompt_through_the_task_api(pipe, golden):
    hp = golden.hyper("t2i")
    kwargs = dict(width=hp["video_width"], height=hp["video_height"], steps=2, decode=False)
    plain = pipe.text_to_image(hp["caption"], **kwargs).latents
    negative = pipe.text_to_image(hp["caption"], negative_prompt=NEGATIVE, **kwargs).latents
    assert (negative - plain).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [3, ["a"]])
def test_negative_prompt_must_be_text(pipe, golden, bad):
    hp = golden.hyper("t2i")
    with pytest.raises(InputError, match="negative_prompt"):
        pipe.text_to_image(hp["caption"], width=hp["video_width"], height=hp["video_height"], steps=1,
                           negative_prompt=bad, decode=False)
