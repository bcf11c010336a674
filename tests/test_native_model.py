"""The native path: Lance as a core MODEL + CONDITIONING, sampled by ComfyUI's own machinery
(SamplerCustomAdvanced + Lance Noise + CFGGuider + euler + lance_flow, KSampler, EasyCache, weight patches).

Parity tests (`-k "native and parity"`) run every generation fixture through core's sampler and compare the final
latents with the official ones (manifest tolerances) and with the library sampler."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import assert_close  # noqa: E402
from test_generation_parity import GEN_TASKS, prepare, settings_for  # noqa: E402
from tests.fixtures.node_fixtures import comfy, models_dir, nodes, tiny_model  # noqa: E402,F401


@pytest.fixture(scope="module")
def native(comfy):
    from lance_nodes import native_nodes
    return native_nodes


def fixture_names(golden):
    names = golden.tasks(*GEN_TASKS)
    if not names:
        pytest.fail(f"no generation fixture in the golden set {golden.root}")
    return names


def core_model(native, tiny_model, hp, guidance=True):
    """Lance Model -> (ModelSamplingAuraFlow for the fixture's shift) -> Lance Guidance."""
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    model = native.LanceModelNode.execute(tiny_model).args[0]
    (model,) = ModelSamplingAuraFlow().patch_aura(model, hp["timestep_shift"])
    if guidance:
        lo, hi = hp["cfg_interval"]
        model = native.LanceGuidance.execute(model, lo, hi, hp["cfg_renorm_type"], hp["cfg_renorm_min"]).args[0]
    return model


def sample_custom_advanced(native, model, positive, negative, latent, hp, steps=None):
    """SamplerCustomAdvanced(Lance Noise, CFGGuider, euler, Lance Scheduler) -> normalized latents [B,C,t,h,w]."""
    import comfy.latent_formats
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, SamplerCustomAdvanced
    sigmas = native.LanceScheduler.execute(model, steps or hp["steps"]).args[0]
    noise = native.LanceNoiseNode.execute(hp["validation_noise_seed"], positive).args[0]
    (guider,) = CFGGuider().get_guider(model, positive, negative, hp["cfg_text_scale"])
    (sampler,) = KSamplerSelect().get_sampler("euler")
    out, _ = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    return comfy.latent_formats.Wan22().process_in(out["samples"])


def run_native(native, tiny_model, golden, name, **model_kw):
    pipe, hp = tiny_model.pipe, golden.hyper(name)
    settings = settings_for(golden, name, decode=False)
    inputs = prepare(pipe, golden, name, settings)
    positive, negative, latent = native.build_conditioning(pipe, inputs)
    model = core_model(native, tiny_model, hp, **model_kw)
    return sample_custom_advanced(native, model, positive, negative, latent, hp), inputs, settings


@pytest.fixture(scope="module")
def native_runs(native, tiny_model, golden):
    """Every generation fixture once through core's sampler, and once through the library (same model)."""
    runs = {}
    for name in fixture_names(golden):
        ours, inputs, settings = run_native(native, tiny_model, golden, name)
        library = tiny_model.pipe.generate(name, "x", inputs, settings).latents
        runs[name] = (ours, library)
    return runs


@pytest.mark.parametrize("name", GEN_TASKS)
def test_native_parity_final_latents(golden, native_runs, name):
    if name not in native_runs:
        pytest.fail(f"fixture {name} missing from the golden set")
    ours, _ = native_runs[name]
    fx = golden.tensors(name)
    key = "out/latent.1" if "out/latent.1" in fx else "out/latent.0"
    assert_close(ours[0].permute(1, 2, 3, 0), fx[key], golden.tolerance(key), f"native {name} {key}")


@pytest.mark.parametrize("name", GEN_TASKS)
def test_native_parity_with_library_sampler(golden, native_runs, name):
    """Core's Euler works in x0 space (about 1 ulp per step from the library's v-space update), so the two
    paths agree to the fixtures' tolerance, not bit for bit."""
    if name not in native_runs:
        pytest.fail(f"fixture {name} missing from the golden set")
    ours, library = native_runs[name]
    key = "out/latent.1" if "out/latent.1" in golden.tensors(name) else "out/latent.0"
    assert_close(ours, library, golden.tolerance(key), f"native vs library {name}")
