"""The nodes run in-process against the tiny checkpoint: output layouts, progress bar + latent previews,
interrupt (model stays usable), text streaming, shared model cache, and the core Wan2.2 VAEDecode parity."""

import pytest
import torch

from tests.fixtures.comfy_env import RELEASE_NAME, TINY_NAME
from tests.helpers import core_wan22_vae, golden_image, golden_video, sampling_widgets

S = 128  # tiny sizes
GEN = sampling_widgets(steps=2, seed=42)


def t2i(nodes, model, **kw):
    args = dict(prompt="a red cat", width=S, height=S, **GEN)
    args.update(kw)
    return nodes.LanceT2I.execute(model, **args)


def test_loader_shares_one_model(nodes, tiny_model):
    (again,) = nodes.LanceLoader.execute(TINY_NAME, "auto", "auto", "auto", "resident").args
    assert again is tiny_model
    assert tiny_model.model_id and tiny_model.patcher is not None
    assert "tiny" in repr(tiny_model)


def test_t2i_outputs(nodes, tiny_model):
    latent, image, context = t2i(nodes, tiny_model, batch_size=2).args
    assert latent["samples"].shape == (2, 48, 1, S // 16, S // 16) and latent["samples"].dtype == torch.float32
    assert image.shape == (2, S, S, 3) and 0 <= image.min() and image.max() <= 1
    assert context.model_id == tiny_model.model_id and len(context.turns) == 1


def test_t2v_and_i2v_outputs(nodes, tiny_model):
    from lance_nodes import compat
    out = nodes.LanceT2V.execute(tiny_model, "a boat", S, S, 5, "video_192p", 8.0, **GEN).args
    latent, frames = out[0], out[1]
    assert latent["samples"].shape == (1, 48, 2, S // 16, S // 16)
    assert frames.shape == (5, S, S, 3)
    if compat.HAS_VIDEO:
        video = out[2]
        assert video.get_dimensions() == (S, S)
        components = video.get_components()
        assert components.images.shape == (5, S, S, 3) and float(components.frame_rate) == 8.0
    out = nodes.LanceT2V.execute(tiny_model, "it moves", S, S, 5, "video_192p", 8.0, start_image=golden_image(),
                                 **GEN).args
    assert out[1].shape[0] == 5 and out[-1].turns[-1].task == "i2v"


def test_edit_chain_and_video_edit(nodes, tiny_model):
    _, image, context = nodes.LanceEdit.execute(tiny_model, golden_image(), "remove the hat", "image_256res", **GEN).args
    assert image.shape[0] == 1 and image.shape[-1] == 3
    _, image2, context2 = nodes.LanceEdit.execute(tiny_model, image, "make the sky green", "image_256res",
                                                  context=context, **GEN).args
    assert [t.task for t in context2.turns] == ["image_edit", "image_edit"]
    out = nodes.LanceVideoEdit.execute(tiny_model, golden_video(), "make it red", "video_192p", 8.0, **GEN).args
    assert out[0]["samples"].shape[1:3] == (48, 2) and out[1].shape[0] == 5
    (text,) = nodes.LanceContextView.execute(context2).args
    assert "image_edit: remove the hat" in text and "make the sky green" in text


def test_understand_streams_text_and_chains_into_edit(nodes, tiny_model, monkeypatch):
    from lance_nodes import compat
    streamed = []
    monkeypatch.setattr(compat, "send_text", lambda node_id, text: streamed.append((node_id, text)))
    out = nodes.LanceUnderstand.execute(tiny_model, "What color?", "", "auto", 6, 0.0, 1.0, 0, image=golden_image())
    text, context = out.args
    assert isinstance(text, str) and context.turns[-1].task == "x2t_image"
    assert out.ui is not None
    assert len(streamed) >= 1 and all(isinstance(t, str) for _, t in streamed)
    _, image, context2 = nodes.LanceEdit.execute(tiny_model, golden_image(), "make it blue", "image_256res",
                                                 context=context, **GEN).args
    assert [t.task for t in context2.turns] == ["x2t_image", "image_edit"]
    text, _ = nodes.LanceUnderstand.execute(tiny_model, "What happens?", "", "video_192p", 4, 0.7, 0.9, 3,
                                            video=golden_video()).args
    assert isinstance(text, str)
    follow_up, _ = nodes.LanceUnderstand.execute(tiny_model, "And now?", "", "auto", 4, 0.0, 1.0, 0,
                                                 context=context).args
    assert isinstance(follow_up, str)


def test_prompt_enhance(nodes, tiny_model):
    (text,) = nodes.LancePromptEnhance.execute(tiny_model, "a cat", "video", 6).args
    assert isinstance(text, str) and text


def test_progress_bar_with_previews_every_step(nodes, tiny_model, comfy, monkeypatch):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args
    calls = []
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    t2i(nodes, tiny_model, steps=3)
    assert [(v, t) for v, t, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    for _, _, preview in calls:
        kind, image, _ = preview
        assert kind == "JPEG" and image.size == (S // 16, S // 16)


def test_interrupt_every_step_keeps_model_usable(nodes, tiny_model, comfy, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 1:
            mm.interrupt_current_processing(True)   # what POST /interrupt does
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(mm.InterruptProcessingException):
        t2i(nodes, tiny_model, steps=5)
    assert seen == [1], "generation must stop at the next step after the interrupt"
    assert not mm.processing_interrupted(), "the interrupt flag is consumed"
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    latent, image, _ = t2i(nodes, tiny_model).args   # the model is still usable
    assert image.shape == (1, S, S, 3)


def test_interrupt_before_start(nodes, tiny_model, comfy):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        nodes.LanceUnderstand.execute(tiny_model, "q", "", "auto", 4, 0.0, 1.0, 0, image=golden_image())
    assert not mm.processing_interrupted()


def test_lance_decode_matches_own_frames(nodes, tiny_model):
    latent, image, _ = t2i(nodes, tiny_model).args
    (decoded,) = nodes.LanceDecode.execute(tiny_model, latent).args
    assert (decoded - image).abs().max() < 1e-4


def test_latent_decodes_with_core_wan22_vae(nodes, tiny_model, comfy):
    """The LATENT of LanceT2I decodes through core VAEDecode (Wan2.2 VAE) to the pixels of Lance's own decode."""
    import nodes as core_nodes
    vae = core_wan22_vae(comfy)
    latent, image, _ = t2i(nodes, tiny_model).args
    (decoded,) = core_nodes.VAEDecode().decode(vae, latent)
    assert decoded.shape == image.shape
    err = (decoded.float() - image).abs().max().item()
    print(f"[parity] core VAEDecode vs Lance decode: max_abs={err:.2e}")
    assert err < 1e-3
    latent, frames = nodes.LanceT2V.execute(tiny_model, "a boat", S, S, 5, "video_192p", 8.0, **GEN).args[:2]
    (decoded,) = core_nodes.VAEDecode().decode(vae, latent)
    assert decoded.shape == frames.shape and (decoded.float() - frames).abs().max().item() < 1e-3


def test_release_name_alias_is_the_same_checkpoint(nodes, models_dir):
    (model,) = nodes.LanceLoader.execute(RELEASE_NAME, "auto", "auto", "auto", "resident").args
    assert model.model_id.startswith("Lance_3B@")
