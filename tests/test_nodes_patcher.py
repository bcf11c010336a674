"""The ComfyUI model patcher the pack builds (lance_nodes/compat.py), in-process on the host's CPU:

- `CoreModelPatcher` where the host has it (0.33.0; main.py rebinds it to ModelPatcherDynamic under Dynamic VRAM),
  ModelPatcher on 0.3.64;
- the reload factory registered as `cached_patcher_init`, driven through core's own clone path, rebuilds the model
  from disk with the same weights;
- a module whose weights already sit on the GPU gets the classic ModelPatcher (the streaming one could not free
  them);
- on a CPU device Dynamic VRAM is off, so the weights are built on the load device (memory_mode "dynamic"
  included: the same results as "resident").

Dynamic VRAM itself needs a GPU with comfy-aimdo: not exercised here.
"""

import pytest
import torch

from tests.fixtures.comfy_env import GOLDEN_DIR


@pytest.fixture(scope="module")
def compat(comfy):
    from lance_nodes import compat as module
    return module


@pytest.fixture(scope="module")
def core(comfy):
    import comfy.model_patcher as module
    return module


class _Holder(torch.nn.Module):
    """A module holding a loaded pipeline, as the pack hands one to the patcher."""

    def __init__(self, pipe):
        super().__init__()
        self.pipe = pipe


def _tiny_module(compat):
    from lance_model import load_lance
    pipe = load_lance(GOLDEN_DIR / "checkpoint", dtype="fp32", device=str(compat.load_device()),
                      operations=compat.manual_cast_ops())
    return _Holder(pipe)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_patcher_class_follows_the_host(compat, core):
    patcher = compat.model_patcher(torch.nn.Linear(4, 4))
    expected = getattr(core, "CoreModelPatcher", core.ModelPatcher)
    assert isinstance(patcher, expected)
    assert patcher.load_device == compat.load_device() and patcher.offload_device == compat.offload_device()


def test_rebound_core_patcher_is_picked_up_at_call_time(compat, core, monkeypatch):
    """main.py rebinds comfy.model_patcher.CoreModelPatcher after the pack imported compat."""
    if not hasattr(core, "CoreModelPatcher"):
        pytest.skip("this host (0.3.64) has no CoreModelPatcher; test_patcher_class_follows_the_host covers it")

    class Rebound(core.ModelPatcher):
        pass
    monkeypatch.setattr(core, "CoreModelPatcher", Rebound)
    assert type(compat.model_patcher(torch.nn.Linear(4, 4))) is Rebound
    assert type(compat.model_patcher(torch.nn.Linear(4, 4), disable_dynamic=True)) is core.ModelPatcher
    # weights already on the GPU: the streaming patcher could never free them, so the classic one is used
    monkeypatch.setattr(compat, "_on_gpu", lambda module: True)
    assert type(compat.model_patcher(torch.nn.Linear(4, 4))) is core.ModelPatcher


def test_cpu_host_has_no_dynamic_vram(compat):
    assert compat.dynamic_vram() is False
    assert compat.weight_device() == compat.load_device()


def test_reload_factory_rebuilds_the_model_from_disk(compat, core):
    module = _tiny_module(compat)
    calls = []

    def reload():
        calls.append(1)
        return _tiny_module(compat)

    patcher = compat.model_patcher(module, reload=reload)
    if not hasattr(patcher, "cached_patcher_init"):
        assert not calls      # 0.3.64: no factory slot, and the model is not loaded twice
        compat.load_to_device(patcher, full=False)
        assert patcher.model is module
        return
    factory, args = patcher.cached_patcher_init[:2]
    assert not calls      # registering the factory loads nothing
    # core's own path for a private copy of the weights (as for a non-dynamic delegate): calls the factory with
    # disable_dynamic=True and clones onto the model it returns
    copy = patcher.clone(force_deepcopy=True)
    assert len(calls) == 1 and copy.model is not module and type(copy) is type(patcher)
    original, rebuilt = _weights(module), _weights(copy.model)
    assert original.keys() == rebuilt.keys()
    assert all(torch.equal(original[k], rebuilt[k]) for k in original)
    # the multi-GPU path calls it without keywords; the result carries the factory on
    again = factory(*args)
    assert len(calls) == 2 and again.cached_patcher_init[0] is factory
    assert isinstance(factory(*args, disable_dynamic=True), core.ModelPatcher)
    compat.load_to_device(copy, full=False)


def _t2i(nodes, model):
    gen = dict(steps=2, shift=3.5, cfg_scale=4.0, cfg_interval_start=0.4, cfg_interval_end=1.0, cfg_renorm="global",
               cfg_renorm_min=0.0, seed=42, batch_size=1)
    return nodes.LanceT2I.execute(model, "a red fox", 64, 64, **gen).args[0]["samples"]


@pytest.fixture
def dynamic_model(compat, models_dir):
    from lance_nodes import nodes
    (model,) = nodes.LanceLoader.execute("tiny", "auto", "auto", "auto", "dynamic").args
    return model


def test_dynamic_memory_mode_builds_the_weights_where_core_streams_them(compat, core, dynamic_model):
    """memory_mode 'dynamic': the weights are built on compat.weight_device() (RAM under Dynamic VRAM, the load
    device elsewhere) and handed to the host's CoreModelPatcher; activations run on the load device."""
    llm = dynamic_model.pipe.llm
    assert llm.vae2llm.weight.device.type == compat.weight_device().type
    assert llm.device == compat.load_device()
    assert isinstance(dynamic_model.patcher, getattr(core, "CoreModelPatcher", core.ModelPatcher))


def test_dynamic_memory_mode_matches_resident(compat, dynamic_model):
    from lance_nodes import nodes
    (resident,) = nodes.LanceLoader.execute("tiny", "auto", "auto", "auto", "resident").args
    ours, reference = _t2i(nodes, dynamic_model), _t2i(nodes, resident)
    if compat.load_device().type == "cpu":
        assert torch.equal(ours, reference)
    else:  # streamed bf16 weights: the same math, possibly other kernels
        assert (ours - reference).abs().max() <= 0.05 * reference.abs().max()
