"""Bad inputs give clear errors naming the input (in-process; tests/test_comfy_server.py repeats them through
the real server). Errors surface as short `lance.InputError` / `lance.CheckpointError` types."""

import pytest
import torch

from tests.helpers import sampling_widgets

S = 128
GEN = sampling_widgets(steps=2, seed=1)


@pytest.fixture(scope="module")
def errors(comfy):
    from lance_nodes import errors
    return errors


def _load(nodes, name):
    return nodes.LanceLoader.execute(name, "auto", "auto", "auto", "resident")


@pytest.mark.parametrize("name, message", [
    ("no_such_model", "not found in the 'lance' model folder"),
    ("not_a_folder.safetensors", "is a file, not a folder"),
    ("empty_folder", "no Lance_3B or Lance_3B_Video/ folder"),
])
def test_loader_bad_folders(nodes, models_dir, errors, name, message):
    with pytest.raises(errors.CheckpointError, match=message) as info:
        _load(nodes, name)
    assert f"{type(info.value).__module__}.{type(info.value).__name__}" == "lance.CheckpointError"


def test_loader_bad_memory_mode(nodes, models_dir, errors):
    with pytest.raises(errors.InputError, match="memory_mode"):
        nodes.LanceLoader.execute("tiny", "auto", "auto", "auto", "gpu_only")


def test_latent_wrong_channels(nodes, tiny_model, errors):
    with pytest.raises(errors.InputError, match="4 channels.*48 channels"):
        nodes.LanceDecode.execute(tiny_model, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(errors.InputError, match=r"expected a LATENT \(a dict with .samples.\)"):
        nodes.LanceDecode.execute(tiny_model, torch.zeros(1, 48, 1, 8, 8))


def test_single_image_where_video_needed(nodes, tiny_model, errors):
    with pytest.raises(errors.InputError, match="video: got 1 frame.*a video is needed"):
        nodes.LanceVideoEdit.execute(tiny_model, torch.rand(1, 64, 64, 3), "red", "video_192p", 8.0, **GEN)
    with pytest.raises(errors.InputError, match="video: got 1 frame"):
        nodes.LanceUnderstand.execute(tiny_model, "q", "", "auto", 4, 0.0, 1.0, 0, video=torch.rand(1, 64, 64, 3))


def test_image_batch_where_one_image_needed(nodes, tiny_model, errors):
    with pytest.raises(errors.InputError, match="IMAGE batch of 5 images.*takes one image"):
        nodes.LanceEdit.execute(tiny_model, torch.rand(5, 64, 64, 3), "red", "image_256res", **GEN)
    with pytest.raises(errors.InputError, match="start_image: got an IMAGE batch of 3"):
        nodes.LanceT2V.execute(tiny_model, "p", S, S, 5, "video_192p", 8.0, start_image=torch.rand(3, 64, 64, 3), **GEN)
    with pytest.raises(errors.InputError, match="image: expected an IMAGE"):
        nodes.LanceEdit.execute(tiny_model, torch.rand(64, 64, 3), "red", "image_256res", **GEN)


def test_understand_needs_media_and_only_one(nodes, tiny_model, errors):
    with pytest.raises(errors.InputError, match="connect an image or a video"):
        nodes.LanceUnderstand.execute(tiny_model, "q", "", "auto", 4, 0.0, 1.0, 0)
    with pytest.raises(errors.InputError, match="both connected"):
        nodes.LanceUnderstand.execute(tiny_model, "q", "", "auto", 4, 0.0, 1.0, 0, image=torch.rand(1, 64, 64, 3),
                                      video=torch.rand(5, 64, 64, 3))


def test_context_from_another_model(nodes, tiny_model, models_dir, errors):
    _, image, context = nodes.LanceT2I.execute(tiny_model, "a cat", S, S, **GEN).args
    (other,) = _load(nodes, "tiny_copy").args
    assert other.model_id != tiny_model.model_id
    with pytest.raises(errors.InputError, match="context: this conversation context was made by another Lance model"):
        nodes.LanceEdit.execute(other, image, "red", "image_256res", context=context, **GEN)
    with pytest.raises(errors.InputError, match="context"):
        nodes.LanceUnderstand.execute(other, "q", "", "auto", 4, 0.0, 1.0, 0, image=image, context=context)
    with pytest.raises(errors.InputError, match="expected a LANCE_CONTEXT"):
        nodes.LanceT2I.execute(other, "a cat", S, S, context="not a context", **GEN)


def test_unsupported_sizes(nodes, tiny_model, errors):
    with pytest.raises(errors.InputError, match="width 2048 exceeds"):
        nodes.LanceT2I.execute(tiny_model, "a cat", 2048, S, **GEN)
    with pytest.raises(errors.InputError, match="height"):
        nodes.LanceT2V.execute(tiny_model, "a boat", S, 8, 5, "video_192p", 8.0, **GEN)


def test_bad_sampling_settings(nodes, tiny_model, errors):
    with pytest.raises(errors.InputError, match="cfg_interval: the start 0.9 must not be greater than the end"):
        nodes.LanceT2I.execute(tiny_model, "a cat", S, S, **{**GEN, "cfg_interval_start": 0.9, "cfg_interval_end": 0.5})
    with pytest.raises(errors.InputError, match="prompt"):
        nodes.LanceT2I.execute(tiny_model, "   ", S, S, **GEN)
    with pytest.raises(errors.InputError, match="prompt is empty"):
        nodes.LancePromptEnhance.execute(tiny_model, "", "image", 4)


def test_model_input_must_be_a_lance_model(nodes, errors):
    with pytest.raises(errors.InputError, match="LANCE_MODEL"):
        nodes.LanceT2I.execute("not a model", "a cat", S, S, **GEN)


def test_other_exceptions_pass_through_untranslated(errors, comfy):
    import comfy.model_management as mm

    @errors.node_errors
    def interrupted():
        raise mm.InterruptProcessingException()

    @errors.node_errors
    def oom():
        raise torch.cuda.OutOfMemoryError("oom")
    with pytest.raises(mm.InterruptProcessingException):
        interrupted()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        oom()
