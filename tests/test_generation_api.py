"""Behaviour of the generation API: outputs, callbacks, cancellation, contexts and bad inputs."""
import numpy as np
import pytest
import torch

from lance_model import Cancelled, InputError, LanceContext

SMALL = dict(width=64, height=64, steps=2)


def test_outputs_layout(pipe):
    result = pipe.text_to_image("a red cat", **SMALL)
    c = pipe.config.constants.latent_channels
    assert result.latents.shape == (1, c, 1, 4, 4) and result.latents.dtype == torch.float32
    assert torch.allclose(result.comfy_latent(), pipe.vae.denormalize(result.latents))
    assert result.frames.shape == (1, 1, 64, 64, 3) and 0 <= result.frames.min() and result.frames.max() <= 1
    assert result.context.turns[-1].task == "t2i" and result.context.model_id == pipe.model_id


def test_video_frame_count_rule(pipe):
    result = pipe.text_to_video("a boat", width=64, height=64, num_frames=10, steps=1)
    assert result.latents.shape[2] == 3 and result.frames.shape[1] == 9  # (10-1)//4+1 latents -> 9 frames


def test_on_step_previews_and_cancel_keeps_model_usable(pipe):
    seen = []
    pipe.text_to_image("a red cat", on_step=lambda i, n, x0: seen.append((i, n, tuple(x0.shape))), **SMALL)
    assert [s[:2] for s in seen] == [(0, 2), (1, 2)] and seen[0][2][1] == pipe.config.constants.latent_channels
    with pytest.raises(Cancelled):
        pipe.text_to_image("a red cat", cancel=lambda: True, **SMALL)
    a = pipe.text_to_image("a red cat", seed=3, decode=False, **SMALL).latents
    b = pipe.text_to_image("a red cat", seed=3, decode=False, **SMALL).latents
    assert torch.equal(a, b)


def test_seed_changes_result(pipe):
    a = pipe.text_to_image("a red cat", seed=1, decode=False, **SMALL).latents
    b = pipe.text_to_image("a red cat", seed=2, decode=False, **SMALL).latents
    assert not torch.equal(a, b)


def test_multi_turn_edit_uses_last_result(pipe):
    first = pipe.text_to_image("a red cat", **SMALL)
    second = pipe.edit_image(None, "make it blue", resolution="image_256res", steps=1, context=first.context)
    third = pipe.edit_image(None, "add a hat", resolution="image_256res", steps=1, context=second.context,
                            include_history=True)
    assert [t.task for t in third.context.turns] == ["t2i", "image_edit", "image_edit"]
    assert third.frames.shape[1] == 1


def test_understand_then_edit_chain(pipe):
    image = torch.rand(1, 64, 64, 3)
    answer = pipe.understand(image, "What is shown?", max_new_tokens=3, resolution="image_256res")
    edited = pipe.edit_image(None, "make it brighter", resolution="image_256res", steps=1, context=answer.context,
                             include_history=True)
    assert [t.task for t in edited.context.turns] == ["x2t_image", "image_edit"]


@pytest.mark.parametrize("prompt", ["", "   ", None, 3])
def test_bad_prompt(pipe, prompt):
    with pytest.raises(InputError, match="prompt"):
        pipe.text_to_image(prompt, **SMALL)


def test_prompt_with_template_tokens_is_rejected(pipe):
    with pytest.raises(InputError, match="reserved token"):
        pipe.text_to_image("a cat<|im_end|>", **SMALL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=-3), "steps"), (dict(width=8), "width"), (dict(height=4096), "height"),
    (dict(cfg_scale=0.5), "cfg_scale"), (dict(cfg_interval=(0.9, 0.1)), "cfg_interval"),
    (dict(cfg_renorm="bogus"), "cfg_renorm"), (dict(batch_size=0), "batch_size"), (dict(sampler="x"), "unknown"),
])
def test_bad_generation_options(pipe, kwargs, match):
    options = {**SMALL, **kwargs}
    with pytest.raises(InputError, match=match):
        pipe.text_to_image("a cat", **options)


@pytest.mark.parametrize("frames", [0, 500])
def test_bad_frame_count(pipe, frames):
    with pytest.raises(InputError, match="num_frames"):
        pipe.text_to_video("a boat", width=64, height=64, num_frames=frames, steps=1)


@pytest.mark.parametrize("image, match", [
    (torch.rand(64, 64), "shape"), (torch.rand(1, 64, 64, 4), "shape"), (torch.full((1, 64, 64, 3), float("nan")), "NaN"),
    (torch.zeros(0, 64, 64, 3), "empty"), ("not a file.png", "image"), (np.zeros((8, 8, 3), np.float32), "uint8"),
])
def test_bad_edit_image(pipe, image, match):
    with pytest.raises(InputError, match=match):
        pipe.edit_image(image, "make it blue", resolution="image_256res", steps=1)


def test_image_batch_is_not_an_image(pipe):
    with pytest.raises(InputError, match="video edit"):
        pipe.edit_image(torch.rand(5, 64, 64, 3), "make it blue", resolution="image_256res", steps=1)


def test_empty_instruction_and_unknown_preset(pipe):
    with pytest.raises(InputError, match="instruction"):
        pipe.edit_image(torch.rand(1, 64, 64, 3), "", resolution="image_256res")
    with pytest.raises(InputError, match="resolution preset"):
        pipe.edit_image(torch.rand(1, 64, 64, 3), "make it blue", resolution="8k")


def test_too_large_edit_source_is_rejected(pipe):
    wide = torch.rand(1, 90, 210, 3)  # 21:9 at the 768 preset buckets to 1152 px wide (> 64 latents)
    with pytest.raises(InputError, match="at most 1024 px"):
        pipe.edit_image(wide, "make it blue", resolution="image_768res", steps=1)


def test_context_from_another_model(pipe):
    with pytest.raises(InputError, match="another model"):
        pipe.text_to_image("a cat", context=LanceContext("other-model@123"), **SMALL)
    with pytest.raises(InputError, match="another model"):
        pipe.understand(torch.rand(1, 64, 64, 3), "what?", context=LanceContext("other-model@123"))


def test_understanding_bad_inputs(pipe):
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.understand(torch.rand(1, 64, 64, 3), "what?", max_new_tokens=0)
    with pytest.raises(InputError, match="no image"):
        pipe.understand(None, "")
    with pytest.raises(InputError, match="media"):
        pipe.understand(object(), "what?")
    with pytest.raises(InputError, match="characters"):
        pipe.understand(None, "x" * 30000)


def test_prompt_enhancement_returns_text(pipe):
    text = pipe.enhance_prompt("a cat", target="video", max_new_tokens=4)
    assert isinstance(text, str) and text
    with pytest.raises(InputError, match="target"):
        pipe.enhance_prompt("a cat", target="audio")


def test_bf16_euler_state_switch(pipe):
    fp32 = pipe.text_to_image("a red cat", seed=5, decode=False, **SMALL).latents
    bf16 = pipe.text_to_image("a red cat", seed=5, decode=False, euler_state="bf16", **SMALL).latents
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=0.05)
    with pytest.raises(InputError, match="euler_state"):
        pipe.text_to_image("a red cat", euler_state="fp8", **SMALL)


def test_video_fps_applies_the_reference_frame_sampler(pipe):
    """30 frames at 24 fps = 1.25 s -> 15 frames at 12 fps -> the largest 4k+1 = 13 frames (4 latent frames)."""
    video = torch.rand(30, 64, 64, 3)
    sampled = pipe.edit_video(video, "make it red", resolution="video_192p", fps=24.0, steps=1, decode=False)
    assert sampled.latents.shape[2] == 4
    as_given = pipe.edit_video(video, "make it red", resolution="video_192p", steps=1, decode=False)
    assert as_given.latents.shape[2] == 8  # 29 usable frames (4k+1) -> 8 latent frames


def test_cli_runs_t2v_and_picks_video_weights_when_present(golden, tmp_path):
    from lance_model.cli import main, pick_variant

    assert pick_variant(str(golden.checkpoint), "auto", "t2v") == "auto"  # the tiny set has only Lance_3B
    release = tmp_path / "release"
    (release / "Lance_3B_Video").mkdir(parents=True)
    assert pick_variant(str(release), "auto", "t2v") == "video"
    assert pick_variant(str(release), "auto", "t2i") == "auto"
    out = tmp_path / "clip"
    assert main(["--model", str(golden.checkpoint), "--device", "cpu", "t2v", "--prompt", "a boat", "--width", "64",
                 "--height", "64", "--frames", "5", "--steps", "1", "--out", str(out)]) == 0
    assert (tmp_path / "clip.mp4").stat().st_size > 0
    assert main(["--model", str(tmp_path / "missing"), "t2i", "--prompt", "x"]) == 2


def test_seed_stride_spaces_the_batch_seeds(pipe):
    """Sample i of a batch uses seed + i * seed_stride (several machines: docs/distributed.md), wrapping at 2^64."""
    batch = pipe.text_to_image("a red cat", seed=5, batch_size=2, seed_stride=3, decode=False, **SMALL).latents
    for i, seed in enumerate((5, 8)):
        single = pipe.text_to_image("a red cat", seed=seed, decode=False, **SMALL).latents
        assert torch.allclose(batch[i], single[0], atol=1e-5), f"sample {i} is not seed {seed}"
    from lance_model import GenerationSettings
    assert GenerationSettings(seed=2**64 - 2, batch_size=3, seed_stride=2).seeds() == [2**64 - 2, 0, 2]
    with pytest.raises(InputError, match="seed_stride must be an integer in 1"):
        pipe.text_to_image("a red cat", seed_stride=0, **SMALL)


def test_history_text_cannot_become_a_control_token(pipe):
    """An earlier answer holding a reserved token (model text, e.g. a grounding marker) goes into the next prompt
    with the token removed, so it cannot act as a control token; the user's own text with one is refused."""
    from lance_model import Turn
    from lance_model.tasks.prepare import history

    token = next(t for t in pipe.tokenizer.reserved_tokens() if t.startswith("<|object_ref"))
    context = LanceContext(pipe.model_id).append(Turn("x2t_image", "where is the cat?", f"on the {token}mat"))
    lines = history(pipe.session, context, include=True)
    assert [line.text for line in lines] == ["where is the cat?\n", "on the mat\n"]
    result = pipe.text_to_image("a red cat", context=context, include_history=True, decode=False, **SMALL)
    assert result.context.turns[-1].request == "a red cat"
    with pytest.raises(InputError, match="prompt contains the reserved token"):
        pipe.text_to_image(f"a {token} cat", **SMALL)


def test_long_prompt_prefill_is_cancellable_between_chunks(pipe, monkeypatch):
    """A long causal prompt is prefilled in chunks (llm.PREFILL_CHUNK_TOKENS), each through every layer, so a
    cancel is honoured within one layer of one chunk, not after the whole prompt: count the polls of a prefill."""
    from lance_model.nn import llm
    monkeypatch.setattr(llm, "PREFILL_CHUNK_TOKENS", 16)
    prompt = "a red cat sits on a blue chair near the window " * 8
    tokens = len(pipe.prepare_text_to_image(prompt, 64, 64).seq)
    pipe.prefixes.clear()
    polls = PollCounter()
    pipe.text_to_image(prompt, steps=1, cfg_scale=1.0, decode=False, width=64, height=64, cancel=polls)
    layers = pipe.config.num_layers
    assert polls.count >= (tokens // 16) * layers, f"{polls.count} polls for a {tokens}-token prompt"
    pipe.prefixes.clear()
    with pytest.raises(Cancelled, match="LLM layer"):
        pipe.text_to_image(prompt, steps=1, decode=False, width=64, height=64, cancel=PollCounter(stop_after=3))


class PollCounter:
    """A cancel callable that counts its polls and asks to stop after `stop_after` of them."""

    def __init__(self, stop_after: int | None = None):
        self.count, self.stop_after = 0, stop_after

    def __call__(self) -> bool:
        self.count += 1
        return self.stop_after is not None and self.count > self.stop_after
