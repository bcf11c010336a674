"""Out of memory on a node (issue 27): each node's message names the Loader settings in use and only remedies the
artist has in ComfyUI (the Loader's memory_mode and weight_dtype choices that need less, the node's own inputs,
core nodes that exist), never the library's advice for load_lance callers; and the latents of a decode that ran
out of memory after sampling are kept even when the output folder cannot take them, in a bounded number of files.

Out of memory is made on the CPU in two ways: the up-front estimate sees 1 KiB available (a request refused before
it starts), or torch's out-of-memory error is raised inside a module (a real one, in the LLM or the VAE decode)."""
from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import sampling_widgets

S = 64
GEN = sampling_widgets(steps=1, seed=1)
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
# the library's advice, for load_lance callers: none of it exists on a node
LIBRARY_ADVICE = ("memory='", "vae_tiling", "load the model with", "memory mode resident", "this error's",
                  "pass a smaller batch", "free device memory")
ALL_LOADER_MODES = ("resident", "offload", "dynamic", "auto", "stream")


@pytest.fixture(scope="module")
def lib(comfy):
    from lance_nodes import errors
    return errors


@pytest.fixture()
def short_of_memory(comfy, monkeypatch):
    """Every up-front estimate sees 1 KiB available (core is not asked to free anything)."""
    import lance_model.runtime.memory as memory
    import lance_nodes.compat as compat
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    monkeypatch.setattr(compat, "free_memory", lambda *args, **kwargs: None)


def raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM)


@pytest.fixture()
def decode_runs_out(tiny_model, monkeypatch):
    """The VAE decode raises torch's out-of-memory error, untiled and tiled."""
    monkeypatch.setattr(type(tiny_model.pipe.vae), "decode", raise_oom)


@pytest.fixture()
def folders(comfy, tmp_path, monkeypatch):
    """ComfyUI's output and temp folders, in a scratch folder."""
    import folder_paths
    output, temp = tmp_path / "output", tmp_path / "temp"
    output.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    monkeypatch.setattr(folder_paths, "temp_directory", str(temp))
    return SimpleNamespace(output=output, temp=temp)


def error_of(run) -> str:
    from lance_nodes.errors import OutOfMemory
    with pytest.raises(OutOfMemory) as info:
        run()
    assert f"{type(info.value).__module__}.{type(info.value).__name__}" == "lance.OutOfMemory"
    return str(info.value)


def assert_node_advice(message: str, mode: str = "resident") -> None:
    assert f"(Lance Loader: memory_mode '{mode}')" in message, message
    assert "To run it in less memory: " in message and message.endswith("The model is still loaded and usable.")
    for advice in LIBRARY_ADVICE:
        assert advice not in message, (advice, message)


def generation_nodes(nodes, model):
    image, video = torch.rand(1, S, S, 3), torch.rand(5, S, S, 3)
    return {
        "LanceT2I": (lambda: nodes.LanceT2I.execute(model, "a red cat", S, S, **GEN),
                     "lower width/height or batch_size"),
        "LanceT2V": (lambda: nodes.LanceT2V.execute(model, "a boat", S, S, 5, "video_192p", 8.0, **GEN),
                     "lower width/height, num_frames or batch_size"),
        "LanceEdit": (lambda: nodes.LanceEdit.execute(model, image, "make it red", "image_256res", **GEN),
                      "pick a smaller resolution or batch_size"),
        "LanceVideoEdit": (lambda: nodes.LanceVideoEdit.execute(model, video, "make it red", "video_192p", 8.0, **GEN),
                           "pick a smaller resolution or batch_size, or edit fewer frames"),
    }


NODES = ["LanceT2I", "LanceT2V", "LanceEdit", "LanceVideoEdit"]


# ---------------------------------------------------------------- each node's advice
@pytest.mark.parametrize("node", NODES)
def test_a_generation_too_large_names_the_loader_and_the_nodes_inputs(nodes, tiny_model, short_of_memory, node):
    run, inputs = generation_nodes(nodes, tiny_model)[node]
    message = error_of(run)
    assert re.match(r"not enough memory on cpu for this request: its [\w ]+ stage needs at least", message), message
    assert_node_advice(message)
    assert "set the Lance Loader's memory_mode to " in message and inputs in message
    assert "as a last resort, set the Lance Loader's weight_dtype to 'fp8_e4m3fn'" in message
    assert "max_new_tokens" not in message and "Latent From Batch" not in message


@pytest.mark.parametrize("node", NODES)
def test_a_generation_out_of_memory_while_sampling_names_the_same_remedies(nodes, tiny_model, monkeypatch, node):
    run, inputs = generation_nodes(nodes, tiny_model)[node]
    monkeypatch.setattr(tiny_model.pipe.llm.language_model.model.layers[0], "forward", raise_oom)
    message = error_of(run)
    assert re.match(rf"\w+ ran out of memory on cpu \({re.escape(OOM)}\) \(Lance Loader", message), message
    assert_node_advice(message)
    assert inputs in message and "weight_dtype" in message


def test_understanding_names_max_new_tokens_and_nothing_of_decoding(nodes, tiny_model, short_of_memory):
    image = torch.rand(1, S, S, 3)
    for run in (lambda: nodes.LanceUnderstand.execute(tiny_model, "what?", "", "auto", 8, 0.0, 1.0, 0, image=image),
                lambda: nodes.LancePromptEnhance.execute(tiny_model, "a cat", "image", 8)):
        message = error_of(run)
        assert_node_advice(message)
        assert "ask for fewer max_new_tokens" in message and "weight_dtype" in message
        assert not re.search(r"tiled|VAE|Latent|width|batch", message), message


@pytest.mark.parametrize("batch", [1, 2])
def test_decodes_name_the_loader_and_how_to_split_the_batch(nodes, tiny_model, decode_runs_out, batch):
    import nodes as core_nodes

    from lance_nodes.native_vae import LanceCoreVAE
    latent = {"samples": torch.zeros(batch, tiny_model.pipe.vae.z_dim, 1, 8, 8)}
    vae = LanceCoreVAE(tiny_model)
    for run in (lambda: nodes.LanceDecode.execute(tiny_model, latent),
                lambda: core_nodes.VAEDecode().decode(vae, latent),
                lambda: core_nodes.VAEDecodeTiled().decode(vae, latent, 256, 64, 64, 8)):
        message = error_of(run)
        assert message.startswith("VAE decode ran out of memory on cpu, "), message
        assert_node_advice(message)
        assert ("decode the 2 samples one at a time (core Latent From Batch)" in message) == (batch == 2)
        assert not re.search(r"weight_dtype|max_new_tokens|width", message), message


def test_encode_names_a_smaller_image(nodes, tiny_model, monkeypatch):
    import nodes as core_nodes

    from lance_nodes.native_vae import LanceCoreVAE
    monkeypatch.setattr(type(tiny_model.pipe.vae), "encode", raise_oom)
    message = error_of(lambda: core_nodes.VAEEncode().encode(LanceCoreVAE(tiny_model), torch.rand(1, S, S, 3)))
    assert message.startswith("VAE encode ran out of memory on cpu, untiled"), message
    assert_node_advice(message)
    assert "encode a smaller image (scale it down first, e.g. with core Upscale Image By)" in message
    assert "weight_dtype" not in message


@pytest.mark.parametrize("mode", ["dynamic", "offload"])
def test_the_mode_named_is_the_loaders(nodes, tiny_model, short_of_memory, mode):
    """The library runs a 'dynamic' Loader's model as memory='resident': the node names the Loader's mode."""
    model = replace(tiny_model, memory_mode=mode)
    message = error_of(lambda: nodes.LanceT2I.execute(model, "a red cat", S, S, **GEN))
    assert_node_advice(message, mode)
    assert ("set the Lance Loader's memory_mode" in message) == (mode == "dynamic")


@pytest.mark.parametrize("mode, weight_dtype, modes, dtypes", [
    ("resident", "default", "'auto', 'stream' or 'offload'", "'fp8_e4m3fn' or 'fp8_e4m3fn (both experts)'"),
    ("dynamic", "default", "'auto', 'stream' or 'offload'", "'fp8_e4m3fn' or 'fp8_e4m3fn (both experts)'"),
    ("auto", "default", "'stream' or 'offload'", "'fp8_e4m3fn' or 'fp8_e4m3fn (both experts)'"),
    ("auto", "fp8_e4m3fn", "'stream' or 'offload'", "'fp8_e4m3fn (both experts)'"),
    ("stream", "fp8_e4m3fn (both experts)", "'offload'", None),
    ("offload", "default", None, "'fp8_e4m3fn' or 'fp8_e4m3fn (both experts)'"),
])
def test_the_remedies_are_the_choices_that_need_less(lib, mode, weight_dtype, modes, dtypes):
    from lance_model import OutOfMemory
    model = SimpleNamespace(memory_mode=mode, weight_dtype=weight_dtype)
    message = str(lib.out_of_memory(OutOfMemory("library text", "it ran out"), model, ALL_LOADER_MODES, "lower it"))
    in_use = f"memory_mode '{mode}'" + (f", weight_dtype '{weight_dtype}'" if weight_dtype != "default" else "")
    assert message.startswith(f"it ran out (Lance Loader: {in_use}). To run it in less memory: "), message
    named_modes = re.search(r"memory_mode to (.*) \(less in VRAM, slower\)", message)
    assert (named_modes and named_modes.group(1)) == modes
    named_dtypes = re.search(r"weight_dtype to (.*?)( with memory_mode 'auto' or 'stream')? \(smaller weights, but "
                             r"the results change\)", message)
    assert (named_dtypes and named_dtypes.group(1)) == dtypes
    if dtypes:   # the Loader takes fp8 weights only where Lance places them
        assert bool(named_dtypes.group(2)) == (mode not in ("auto", "stream")), message
    assert "lower it" in message and "library text" not in message


def test_only_choices_the_loader_has_are_named(lib):
    from lance_model import OutOfMemory
    model = SimpleNamespace(memory_mode="resident")    # a LoadedLance without weight_dtype: the default
    message = str(lib.out_of_memory(OutOfMemory("x", "it ran out"), model, ("resident", "offload"), runs_llm=False))
    assert message == ("it ran out (Lance Loader: memory_mode 'resident'). To run it in less memory: set the Lance "
                       "Loader's memory_mode to 'offload' (less in VRAM, slower). The model is still loaded and "
                       "usable.")


# ---------------------------------------------------------------- the latents of a decode that ran out of memory
def t2i_latent(nodes, model, seed: int) -> torch.Tensor:
    return nodes.LanceT2I.execute(model, "a red cat", S, S, **{**GEN, "seed": seed}).args[0]["samples"]


def saved_path(message: str) -> str:
    return re.search(r"saved to (\S+\.latent)", message).group(1)


def test_decode_out_of_memory_saves_the_sampled_latent(nodes, tiny_model, folders, monkeypatch):
    """Sampling finished but the VAE decode ran out of memory, untiled and tiled: the node's error names the
    .latent file in output/lance the sampled LATENT was saved to (core's SaveLatent format), holding exactly it."""
    from safetensors.torch import load_file   # as core's Load Latent reads it
    reference = t2i_latent(nodes, tiny_model, 9)
    monkeypatch.setattr(type(tiny_model.pipe.vae), "decode", raise_oom)
    message = error_of(lambda: t2i_latent(nodes, tiny_model, 9))
    assert message.startswith(f"sampling finished, but decoding its latents ran out of memory on cpu, untiled "
                              f"({OOM}) and tiled ({OOM}) (Lance Loader: memory_mode 'resident'). The sampled LATENT "
                              f"is saved to {folders.output / 'lance' / 'undecoded_00001_.latent'}: copy it into "
                              f"ComfyUI's input folder, load it with Load Latent"), message
    assert_node_advice(message)
    assert "lower width/height or batch_size" in message and "weight_dtype" not in message
    assert torch.equal(load_file(saved_path(message))["latent_tensor"], reference)


def test_a_file_where_the_output_folder_should_be_sends_the_latent_to_the_temp_folder(nodes, tiny_model, folders,
                                                                                        decode_runs_out):
    from safetensors.torch import load_file
    (folders.output / "lance").write_text("a file where the folder should be")
    message = error_of(lambda: t2i_latent(nodes, tiny_model, 3))
    assert message.startswith("sampling finished, but decoding its latents ran out of memory"), message
    assert (f"The sampled LATENT could not be saved in the output folder (Not a directory: {folders.output / 'lance'}"
            f"), so it is saved to {folders.temp / 'lance' / 'undecoded_00001_.latent'}, in ComfyUI's temp folder, "
            f"which ComfyUI empties when it starts or stops") in message, message
    assert_node_advice(message)
    assert load_file(saved_path(message))["latent_tensor"].shape[1] == tiny_model.pipe.vae.z_dim


def test_when_no_folder_takes_the_latent_the_message_says_why(nodes, tiny_model, folders, decode_runs_out):
    (folders.output / "lance").write_text("not a folder")
    folders.temp.mkdir()
    (folders.temp / "lance").write_text("not a folder either")
    message = error_of(lambda: t2i_latent(nodes, tiny_model, 3))
    assert (f"The sampled LATENT could not be kept: saving it failed in the output folder (Not a directory: "
            f"{folders.output / 'lance'}) and in ComfyUI's temp folder (Not a directory: {folders.temp / 'lance'})"
            ) in message, message
    assert_node_advice(message)


def test_a_failed_write_leaves_no_partial_file(nodes, tiny_model, folders, decode_runs_out, monkeypatch):
    """A disk that fills up during the write: the half-written file is removed, the temp folder takes the latent."""
    import errno

    import comfy.utils
    save = comfy.utils.save_torch_file

    def disk_full_in_output(tensors, path, *args, **kwargs):
        if path.startswith(str(folders.output)):
            with open(path, "wb") as handle:
                handle.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return save(tensors, path, *args, **kwargs)
    monkeypatch.setattr(comfy.utils, "save_torch_file", disk_full_in_output)
    message = error_of(lambda: t2i_latent(nodes, tiny_model, 3))
    assert "could not be saved in the output folder (No space left on device: " in message, message
    assert list((folders.output / "lance").iterdir()) == []
    assert saved_path(message).startswith(str(folders.temp))


def test_only_the_newest_undecoded_files_are_kept(nodes, tiny_model, folders, decode_runs_out):
    from lance_nodes.runtime import KEPT_UNDECODED
    lance = folders.output / "lance"
    lance.mkdir()
    older = [lance / f"undecoded_{n:05}_.latent" for n in range(1, KEPT_UNDECODED + 3)]
    others = [lance / "undecoded_notes.txt", lance / "mine_00001_.latent", lance / "undecoded_00001_.png"]
    for path in older + others:
        path.write_bytes(b"x")
    message = error_of(lambda: t2i_latent(nodes, tiny_model, 3))
    newest = lance / f"undecoded_{len(older) + 1:05}_.latent"
    assert saved_path(message) == str(newest)
    assert f"the last {KEPT_UNDECODED} of these files are kept" in message
    kept = sorted(path for path in lance.iterdir() if path not in others)
    assert kept == (older + [newest])[-KEPT_UNDECODED:]
    assert all(path.exists() for path in others)
