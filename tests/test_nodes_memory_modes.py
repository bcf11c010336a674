"""The Lance Loader's memory modes where the library places the weights itself (auto: the VRAM plan; stream) and
its weight_dtype (fp8 only there), in-process ComfyUI on the CPU: identical results to resident, the plan shown on
the node, clear refusals."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import sampling_widgets

SMALL = dict(prompt="a red cat", width=64, height=64, **sampling_widgets(steps=2))


@pytest.fixture(scope="module")
def is_placed_patcher(comfy):
    from lance_nodes.placed_patcher import is_placed_patcher as check
    return check


@pytest.fixture(scope="module")
def errors(comfy):
    from lance_nodes import errors as module
    return module


def load(nodes, memory_mode, weight_dtype="default"):
    return nodes.LanceLoader.execute("tiny", "auto", "auto", "auto", memory_mode, weight_dtype)


@pytest.mark.parametrize("memory_mode", ["auto", "stream"])
def test_library_placed_modes_equal_resident_and_show_their_plan(nodes, tiny_model, is_placed_patcher, memory_mode):
    out = load(nodes, memory_mode)
    (model,) = out.args
    assert is_placed_patcher(model.patcher) and model.pipe.plan is not None   # core sees them, never moves them
    assert out.ui.value.startswith(f"memory_mode {memory_mode}: ") and model.pipe.plan.describe() in out.ui.value
    ours = nodes.LanceT2I.execute(model, **SMALL).args[0]["samples"]
    reference = nodes.LanceT2I.execute(tiny_model, **SMALL).args[0]["samples"]
    assert torch.equal(ours, reference)


def loaded_entry(patcher):
    """Core's entry for `patcher` in its list of loaded models, or None."""
    import comfy.model_management as mm
    return next((entry for entry in mm.current_loaded_models if entry.model is patcher), None)


@pytest.mark.parametrize("memory_mode", ["auto", "stream", "offload"])
def test_core_sees_the_plans_device_bytes_and_unloads_them_for_other_models(nodes, tiny_model, memory_mode):
    """Core's memory manager sees a library-placed model through its patcher: loaded by a Lance run, sized as the
    bytes the plan keeps on the device (none in offload mode), kept while Lance itself asks for room, unloaded whole
    when core frees memory for another model (the weights leave the device), loaded again by the next Lance run
    with the same result."""
    import comfy.model_management as mm
    (model,) = load(nodes, memory_mode).args
    patcher, session = model.patcher, model.pipe.session
    assert loaded_entry(patcher) is None and patcher.loaded_size() == 0   # placed when Lance first runs
    first = nodes.LanceT2I.execute(model, **SMALL).args[0]["samples"]
    entry = loaded_entry(patcher)
    assert entry is not None and entry.model_loaded_memory() == entry.model_memory()
    assert patcher.model_size() == session.device_bytes(planned=True) == session.device_bytes()
    assert (patcher.model_size() > 0) == (memory_mode != "offload")
    others = [other for other in mm.current_loaded_models if other is not entry]
    mm.free_memory(1e30, patcher.load_device, keep_loaded=others + [entry])
    assert loaded_entry(patcher) is entry and session.weights_placed
    mm.free_memory(1e30, patcher.load_device, keep_loaded=others)
    assert loaded_entry(patcher) is None and not session.weights_placed and patcher.loaded_size() == 0
    assert patcher.current_loaded_device() == patcher.offload_device
    again = nodes.LanceT2I.execute(model, **SMALL).args[0]["samples"]
    assert loaded_entry(patcher) is not None and session.weights_placed and torch.equal(again, first)


def test_rehearsal_core_unloads_one_placed_model_to_place_another_on_a_gpu(comfy, models_dir, second_device,
                                                                           monkeypatch):
    """Core's GPU branch of load_models_gpu (skipped for CPU models): two library-placed models on a card that holds
    one of them. Each Lance call's host hook asks core to load its model; core frees room for that model's size by
    unloading the other (its weights leave the device) and the model's weights then go there. The card is the second
    device (torch's lazy tensors) behind a fake `cuda:0` whose free memory is the capacity minus the bytes really on
    it."""
    import comfy.model_management as mm

    from lance_model.runtime.session import SCOPE_ALL
    from lance_nodes import runtime
    from lance_nodes.placed_patcher import placed_patcher
    models = [runtime._load("tiny", runtime.resolve_model_path("tiny"), "auto", "auto", "auto", memory, "default")
              for memory in ("auto", "stream")]
    gpu = torch.device("cuda", 0)
    for model in models:
        model.pipe.session.device = second_device
        model.patcher = placed_patcher(model.pipe.session, gpu, torch.device("cpu"))
        runtime.connect_host(model.pipe.session, model.patcher)

    def on_gpu(model) -> int:
        session = model.pipe.session
        tensors = {id(t): t for module in (session.llm, session.vit_module, session.vae_module)
                   for t in [*module.parameters(), *module.buffers()] if t.device == second_device}
        slots = [slot for stream in (session.streamer.experts.values() if session.streamer else ())
                 for slot in stream.slots if slot.device == second_device]
        return sum(t.numel() * t.element_size() for t in [*tensors.values(), *slots])

    sizes = [model.patcher.model_size() for model in models]
    reserve = max(mm.minimum_inference_memory(), mm.extra_reserved_memory())
    capacity = reserve + 1.1 * max(sizes) + min(sizes) // 2   # room for one model, not for both

    def free(dev=None, torch_free_too=False):
        left = capacity - sum(on_gpu(model) for model in models) if dev == gpu else mm.psutil.virtual_memory().available
        return (left, 0) if torch_free_too else left
    monkeypatch.setattr(mm, "get_free_memory", free)
    try:
        for first, second in ((0, 1), (1, 0), (0, 1)):
            models[first].pipe.session.before_call(SCOPE_ALL)
            assert on_gpu(models[first]) == sizes[first] == models[first].patcher.loaded_size() > 0
            assert on_gpu(models[second]) == 0 == models[second].patcher.loaded_size()
            assert [entry.model for entry in mm.current_loaded_models if entry.device == gpu] == [models[first].patcher]
    finally:
        for model in models:
            mm.free_memory(1e30, gpu)
            model.pipe.session.device = torch.device("cpu")


def test_auto_plans_with_the_memory_core_can_free(nodes, models_dir, monkeypatch):
    """memory_mode auto's budget is what the device can give plus what the models core holds there would free:
    a card that other models fill still gets the plan Lance would get alone (core unloads them when Lance runs)."""
    from lance_model.runtime import vram_plan
    from lance_nodes import compat, runtime
    (alone,) = load(nodes, "stream").args
    session = alone.pipe.session
    sizes = vram_plan.WeightBytes.of(session.llm, session.vit_module, session.vae_module)
    work = vram_plan.working_reserve(session.config, int(session.vae_module.config.decoder_base_dim), session.dtype)
    resident_plan, staged_plan = vram_plan.candidates()[:2]
    resident, staged = (sizes.device_bytes(plan) + work for plan in (resident_plan, staged_plan))
    monkeypatch.setattr(vram_plan, "device_budget", lambda device: staged)

    def auto_plan(reclaimable: int):
        monkeypatch.setattr(compat, "reclaimable_bytes", lambda device: reclaimable)
        return runtime._load("tiny", alone.path, "auto", "auto", "auto", "auto", "default").pipe.plan
    assert auto_plan(0) == staged_plan and auto_plan(resident - staged) == resident_plan


def test_a_placed_model_is_not_core_managed(nodes, models_dir):
    """Core's generic walks over a placed model's patcher see no weights (they are the library's to move), and a
    clone being freed leaves them where they are."""
    import gc
    (model,) = load(nodes, "stream").args
    patcher = model.patcher
    assert patcher.model.state_dict() == {} and patcher.session is model.pipe.session
    patcher.partially_load(patcher.load_device)
    assert model.pipe.session.weights_placed
    patcher.clone()
    gc.collect()
    assert model.pipe.session.weights_placed


def test_a_dropped_placed_model_is_freed_at_once(nodes, tiny_model):
    """No reference cycle through the patcher: a placed model no graph holds is freed without the garbage collector
    (its device and host memory at once), and core's list keeps no dead entry."""
    import gc
    import weakref

    import comfy.model_management as mm
    (model,) = load(nodes, "stream").args
    nodes.LanceT2I.execute(model, **SMALL)
    session = weakref.ref(model.pipe.session)
    load(nodes, "resident")   # the last used model is another one
    gc.disable()
    try:
        del model
        assert session() is None
    finally:
        gc.enable()
    mm.cleanup_models()
    assert not [entry for entry in mm.current_loaded_models if entry.is_dead()]


def test_resident_shows_that_comfyui_manages_the_weights(nodes, tiny_model):
    out = load(nodes, "resident")
    assert out.ui.value == "memory_mode resident: ComfyUI manages the weights (partial loads on small cards)"


def test_fp8_weight_dtype_is_stored_as_asked_and_said_to_change_the_picture(nodes):
    out = load(nodes, "stream", "fp8_e4m3fn")
    (model,) = out.args
    assert model.pipe.plan.fp8 == ("und",) and "change the picture" in out.ui.value
    assert model.weight_dtype == "fp8_e4m3fn" and "weight_dtype=fp8_e4m3fn" in repr(model)


@pytest.mark.parametrize("memory_mode", ["resident", "dynamic", "offload"])
def test_fp8_only_where_lance_places_the_weights(nodes, errors, models_dir, memory_mode):
    with pytest.raises(errors.InputError, match=r"weight_dtype 'fp8_e4m3fn \(both experts\)' needs memory_mode "
                                                r"'auto' or 'stream'"):
        load(nodes, memory_mode, "fp8_e4m3fn (both experts)")


def test_native_path_refuses_a_library_placed_model_naming_its_mode(nodes, errors, models_dir):
    from lance_nodes import native_nodes

    (model,) = load(nodes, "auto").args
    with pytest.raises(errors.InputError, match="'auto' places the weights itself"):
        native_nodes.native_patcher(model)


def test_bad_weight_dtype_names_the_options(nodes, errors, models_dir):
    with pytest.raises(errors.InputError, match=r"weight_dtype must be one of \['default', 'fp8_e4m3fn'"):
        load(nodes, "auto", "fp16")
