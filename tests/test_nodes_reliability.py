"""The node side of reliability (in-process): the model cache never touches core's loaded-model list by hand,
lets different models coexist, keeps a good model when a load fails, reloads replaced files; names resolve only
inside the registered `lance` folders; out of memory leaves the cached model usable."""
import gc
import logging
import os
import shutil
import threading

import pytest
import torch

from tests.fixtures.comfy_env import GOLDEN_DIR
from tests.helpers import sampling_widgets

S = 64
GEN = sampling_widgets(steps=1, seed=1)


@pytest.fixture(scope="module")
def runtime(comfy):
    from lance_nodes import runtime as module
    return module


@pytest.fixture(scope="module")
def lib(comfy):
    from lance_nodes import errors
    return errors


def load(nodes, name, variant="auto", memory="resident"):
    return nodes.LanceLoader.execute(name, variant, "auto", "auto", memory).args[0]


def t2i(nodes, model, **kw):
    return nodes.LanceT2I.execute(model, "a red cat", S, S, **{**GEN, **kw}).args


@pytest.fixture()
def own_copy(models_dir):
    """A private copy of the checkpoint in the registered folder (so tests may replace its files)."""
    root = models_dir / "lance" / "mutable_copy"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(GOLDEN_DIR / "checkpoint", root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_models_with_different_options_coexist(nodes, tiny_model):
    image_variant = load(nodes, "tiny", variant="image")
    assert image_variant is not tiny_model
    assert load(nodes, "tiny") is tiny_model and load(nodes, "tiny", variant="image") is image_variant
    t2i(nodes, tiny_model)
    t2i(nodes, image_variant)
    import comfy.model_management as mm
    assert all(entry.real_model() is not None for entry in mm.current_loaded_models if entry.model is not None)


def test_dropped_models_leave_core_list_consistent(nodes, tiny_model):
    """A model no graph holds any more is freed by core's own weak-reference bookkeeping, never popped by hand."""
    import comfy.model_management as mm
    other = load(nodes, "tiny", memory="offload")
    t2i(nodes, other)
    load(nodes, "tiny")          # the last used model is the one kept
    del other
    gc.collect()
    mm.cleanup_models_gc()
    mm.cleanup_models()
    assert not [entry for entry in mm.current_loaded_models if entry.is_dead()]
    t2i(nodes, tiny_model)


def test_failed_load_keeps_the_cached_model(nodes, tiny_model, lib):
    with pytest.raises(lib.CheckpointError):
        load(nodes, "empty_folder")
    assert load(nodes, "tiny") is tiny_model


def test_names_resolve_only_inside_the_lance_folders(nodes, models_dir, lib, tmp_path):
    outside = tmp_path / "outside_release"
    shutil.copytree(GOLDEN_DIR / "checkpoint", outside)
    (tmp_path / "private_notes.txt").write_text("secret")
    for name in (str(outside), str(tmp_path), "../" + outside.name, "tiny/../tiny", "", "."):
        with pytest.raises(lib.CheckpointError, match="model_name") as info:
            load(nodes, name)
        assert "private_notes" not in str(info.value) and "Lance_3B'" not in str(info.value)


def test_a_symlink_inside_the_folder_is_the_users_choice(nodes, tiny_model, models_dir):
    link = models_dir / "lance" / "tiny"
    assert link.is_symlink() and tiny_model.path == os.path.realpath(link)
    assert load(nodes, "tiny") is tiny_model


def test_replaced_weights_are_reloaded(nodes, own_copy, runtime, caplog):
    first = load(nodes, "mutable_copy")
    before = runtime.model_files_fingerprint("mutable_copy")
    weights = own_copy / "Lance_3B" / "model.safetensors"
    replacement = weights.with_suffix(".new")
    shutil.copyfile(weights, replacement)
    os.replace(replacement, weights)                       # an in-place re-download: a new inode
    assert runtime.model_files_fingerprint("mutable_copy") != before  # ComfyUI re-runs the loader
    with caplog.at_level(logging.WARNING, logger="lance_nodes"):
        second = load(nodes, "mutable_copy")
    assert second is not first and "changed on disk" in caplog.text
    assert load(nodes, "mutable_copy") is second
    t2i(nodes, second)


def test_truncated_weights_after_load_never_crash_a_run(nodes, own_copy):
    """The loaded weights are private copies: a file shrinking under a loaded model cannot SIGBUS the host."""
    model = load(nodes, "mutable_copy")
    for path in (own_copy / "Lance_3B" / "model.safetensors", own_copy / "Qwen2.5-VL-ViT" / "vit.safetensors",
                 own_copy / "Wan2.2_VAE.pth"):
        with open(path, "r+b") as handle:
            handle.truncate(16)
    latent, image, _ = t2i(nodes, model)     # the cached (stale) model still runs safely
    assert image.shape == (1, S, S, 3)


def test_out_of_memory_frees_and_keeps_the_model(nodes, tiny_model, lib, monkeypatch):
    layer = tiny_model.pipe.llm.language_model.model.layers[0]

    def explode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(layer, "forward", explode)
    with pytest.raises(lib.OutOfMemory, match="offload") as info:
        t2i(nodes, tiny_model)
    assert f"{type(info.value).__module__}.{type(info.value).__name__}" == "lance.OutOfMemory"
    monkeypatch.undo()
    assert load(nodes, "tiny") is tiny_model
    reference = t2i(nodes, tiny_model, seed=5)[0]["samples"]
    assert torch.equal(t2i(nodes, tiny_model, seed=5)[0]["samples"], reference)


def test_largest_seed_with_a_batch(nodes, tiny_model):
    latent = t2i(nodes, tiny_model, seed=2 ** 64 - 1, batch_size=2)[0]["samples"]
    assert latent.shape[0] == 2 and torch.isfinite(latent).all()


def test_two_prompts_at_once_on_one_model_never_mix(nodes, tiny_model):
    alone = {seed: t2i(nodes, tiny_model, seed=seed)[0]["samples"] for seed in (11, 12)}
    results, errors = {}, []

    def worker(seed):
        try:
            results[seed] = t2i(nodes, tiny_model, seed=seed)[0]["samples"]
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and all(torch.equal(results[s], alone[s]) for s in alone)


def test_interrupt_during_decode_stops_it(nodes, tiny_model, comfy):
    import comfy.model_management as mm
    samples = t2i(nodes, tiny_model)[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes.LanceDecode.execute(tiny_model, samples)
    finally:
        mm.interrupt_current_processing(False)
    assert nodes.LanceDecode.execute(tiny_model, samples).args[0].shape == (1, S, S, 3)


def test_a_request_that_does_not_fit_asks_core_to_free_memory_first(nodes, tiny_model, lib, monkeypatch):
    """The library's up-front estimate calls the host's make_room before refusing: core's free_memory runs,
    keeping this model; then the clear lance.OutOfMemory error (nothing was started)."""
    import comfy.model_management as mm
    calls = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=(): calls.append((need, device, keep_loaded)))
    import lance_model.runtime.memory as memory
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(lib.OutOfMemory, match="offload"):
        t2i(nodes, tiny_model)
    assert calls and calls[0][2][0].model is tiny_model.patcher


def test_the_patcher_has_a_reload_factory_where_the_host_supports_it(tiny_model):
    """Core's cached_patcher_init (newer hosts: MultiGPU copies, non-dynamic clones) rebuilds the model from disk."""
    patcher = tiny_model.patcher
    if not hasattr(patcher, "cached_patcher_init"):
        pytest.skip("this ComfyUI has no cached_patcher_init (0.3.64): nothing to register")
    factory, args = patcher.cached_patcher_init
    copy = factory(*args)
    assert copy is not patcher and type(copy.model) is type(patcher.model)
    ours, theirs = patcher.model.state_dict(), copy.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_dropped_model_is_freed_without_waiting_for_gc(nodes, tiny_model):
    """No reference cycle keeps a model no graph holds any more (its weights would live until the next gc)."""
    import weakref
    other = load(nodes, "tiny", variant="image")
    t2i(nodes, other)
    load(nodes, "tiny")                      # the last used model is another one
    pipe = weakref.ref(other.pipe)
    gc.disable()
    try:
        del other
        assert pipe() is None, "a reference cycle keeps the dropped model alive"
    finally:
        gc.enable()
