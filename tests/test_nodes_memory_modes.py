"""The Lance Loader's memory modes where the library places the weights itself (auto: the VRAM plan; stream) and
its weight_dtype (fp8 only there), in-process ComfyUI on the CPU: identical results to resident, the plan shown on
the node, clear refusals."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import sampling_widgets

SMALL = dict(prompt="a red cat", width=64, height=64, **sampling_widgets(steps=2))


@pytest.fixture(scope="module")
def errors(comfy):
    from lance_nodes import errors as module
    return module


def load(nodes, memory_mode, weight_dtype="default"):
    return nodes.LanceLoader.execute("tiny", "auto", "auto", "auto", memory_mode, weight_dtype)


@pytest.mark.parametrize("memory_mode", ["auto", "stream"])
def test_library_placed_modes_equal_resident_and_show_their_plan(nodes, tiny_model, memory_mode):
    out = load(nodes, memory_mode)
    (model,) = out.args
    assert model.patcher is None and model.pipe.plan is not None   # no core patcher moves these weights
    assert out.ui.value.startswith(f"memory_mode {memory_mode}: ") and model.pipe.plan.describe() in out.ui.value
    ours = nodes.LanceT2I.execute(model, **SMALL).args[0]["samples"]
    reference = nodes.LanceT2I.execute(tiny_model, **SMALL).args[0]["samples"]
    assert torch.equal(ours, reference)


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
