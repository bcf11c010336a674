"""The native path: Lance as a core MODEL + CONDITIONING, sampled by ComfyUI's own machinery
(SamplerCustomAdvanced + Lance Noise + CFGGuider + euler + lance_flow, KSampler, EasyCache, weight patches).

Parity tests (`-k "native and parity"`) run every generation fixture through core's sampler and compare the final
latents with the official ones (manifest tolerances) and with the library sampler."""

import pytest
import torch

from tests.helpers import GEN_TASKS, assert_close, core_wan22_vae, golden_image, prepare, sampling_widgets, settings_for


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
    from comfy_extras.nodes_custom_sampler import (
        CFGGuider,
        KSamplerSelect,
        SamplerCustomAdvanced,
    )
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
    positive, negative, latent, _ = native.build_conditioning(pipe, inputs)
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


# ---------------------------------------------------------------- step-0 velocities, split batching, KSampler
class Recorder:
    """A DIFFUSION_MODEL wrapper that keeps every call's output and cond_or_uncond."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        self.calls.append((list(args[-1].get("cond_or_uncond", [])), out.detach().clone()))
        return out


def with_recorder(model):
    import comfy.patcher_extension
    recorder = Recorder()
    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_recorder", recorder)
    return model, recorder


@pytest.mark.parametrize("name", GEN_TASKS)
def test_native_parity_step0_velocities_bit_equal(native, tiny_model, golden, name):
    """Core batches [uncond, cond] in one call; the model runs them cond first with the library's cache layout,
    so step 0's velocities are the library's bit for bit."""
    from lance_model.tasks.request import video_to_tokens
    if name not in golden.manifest["fixtures"]:
        pytest.fail(f"fixture {name} missing from the golden set")
    pipe, hp = tiny_model.pipe, golden.hyper(name)
    settings = settings_for(golden, name, decode=False)
    inputs = prepare(pipe, golden, name, settings)
    captured = {}

    def observer(info):
        if info.step == 0:
            captured.update(cond=info.v_cond.clone(), uncond=info.v_uncond.clone())
    pipe.generate(name, "x", inputs, settings, observer=observer)
    positive, negative, latent, _ = native.build_conditioning(pipe, inputs)
    model, recorder = with_recorder(core_model(native, tiny_model, hp))
    sample_custom_advanced(native, model, positive, negative, latent, hp)
    roles, out = recorder.calls[0]
    assert sorted(roles) == [0, 1], f"step 0 should batch both branches, got {roles}"
    v = dict(zip(roles, video_to_tokens(out).chunk(2)))
    assert torch.equal(v[0], captured["cond"]), f"{name}: step-0 cond velocity differs from the library"
    assert torch.equal(v[1], captured["uncond"]), f"{name}: step-0 uncond velocity differs from the library"


def test_native_parity_split_branches(native, tiny_model, golden, monkeypatch):
    """When core sends cond and uncond as two calls (low memory), the result is the library's sequential CFG."""
    name = fixture_names(golden)[0]
    model_base = tiny_model.patcher.model
    monkeypatch.setattr(model_base, "memory_required", lambda *a, **k: float("inf"))
    ours, inputs, settings = run_native(native, tiny_model, golden, name)
    settings.batched_cfg = False
    library = tiny_model.pipe.generate(name, "x", inputs, settings).latents
    assert_close(ours, library, golden.tolerance("out/latent.0"), f"native split vs library sequential {name}")


def test_native_parity_ksampler_lance_flow(native, tiny_model, golden):
    """Core KSampler with euler + lance_flow: the same result as the library given KSampler's noise."""
    import comfy.sample
    import nodes as core_nodes

    from lance_model.tasks.request import video_to_tokens
    name = golden.tasks("t2i", *GEN_TASKS)[0]
    pipe, hp = tiny_model.pipe, golden.hyper(name)
    settings = settings_for(golden, name, decode=False)
    inputs = prepare(pipe, golden, name, settings)
    positive, negative, latent, _ = native.build_conditioning(pipe, inputs)
    model = core_model(native, tiny_model, hp)
    seed = hp["validation_noise_seed"]
    assert "lance_flow" in core_nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0]
    (out,) = core_nodes.KSampler().sample(model, seed, hp["steps"], hp["cfg_text_scale"], "euler", "lance_flow",
                                          positive, negative, latent)
    import comfy.latent_formats
    ours = comfy.latent_formats.Wan22().process_in(out["samples"])
    noise = video_to_tokens(comfy.sample.prepare_noise(latent["samples"], seed))
    library = pipe.generate(name, "x", inputs, settings, noise=noise).latents
    assert_close(ours, library, golden.tolerance("out/latent.0"), f"native KSampler vs library {name}")


def test_lance_flow_scheduler_is_exact(native, tiny_model, golden):
    import comfy.samplers

    from lance_model.tasks.sampler import flow_timesteps
    model = native.LanceModelNode.execute(tiny_model).args[0]
    for steps in (3, 28, 30):
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "lance_flow", steps)
        assert torch.equal(sigmas, flow_timesteps(steps, 3.5))


# ---------------------------------------------------------------- core features on the native MODEL
T2I_STEPS = 30


def t2i_run(native, tiny_model, golden, model=None, steps=T2I_STEPS):
    pipe = tiny_model.pipe
    name = golden.tasks("t2i", *GEN_TASKS)[0]
    hp = golden.hyper(name)
    settings = settings_for(golden, name, decode=False)
    settings.steps = steps
    inputs = prepare(pipe, golden, name, settings)
    positive, negative, latent, _ = native.build_conditioning(pipe, inputs)
    model = model or core_model(native, tiny_model, hp)
    return sample_custom_advanced(native, model, positive, negative, latent, hp, steps=steps), inputs, settings


def test_native_easycache_skips_model_calls(native, tiny_model, golden):
    from comfy_extras.nodes_easycache import EasyCacheNode
    diffusion = tiny_model.patcher.model.diffusion_model
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    before = diffusion.calls
    plain, _, _ = t2i_run(native, tiny_model, golden)
    plain_calls = diffusion.calls - before
    cached_model = EasyCacheNode.execute(core_model(native, tiny_model, hp), 0.2, 0.15, 0.95, False).args[0]
    before = diffusion.calls
    cached, _, _ = t2i_run(native, tiny_model, golden, model=cached_model)
    cached_calls = diffusion.calls - before
    print(f"[native] EasyCache: {cached_calls} model calls instead of {plain_calls} ({T2I_STEPS} steps), "
          f"max change {(cached - plain).abs().max():.3e}")
    assert plain_calls == T2I_STEPS
    assert 0 < cached_calls < plain_calls
    assert torch.isfinite(cached).all()


def library_with_weight_edit(tiny_model, weight, delta, inputs, settings):
    """The library's t2i latents with `delta` added to `weight` in place (then restored): what a weight patch
    should equal. The unpatched patcher is loaded first (what every library call does through the session's
    before_call hook); an edit in place happens behind any patcher's back, so the stored prefixes are dropped
    before and after."""
    tiny_model.pipe.session.before_call("all")
    original = weight.clone()
    with torch.no_grad():
        weight.add_(delta)
    tiny_model.pipe.prefixes.clear()
    try:
        return tiny_model.pipe.generate("t2i", "x", inputs, settings).latents
    finally:
        with torch.no_grad():
            weight.copy_(original)
        tiny_model.pipe.prefixes.clear()


@pytest.mark.parametrize("expert", ["und", "gen"])
def test_native_weight_patch_reaches_prefix_and_steps(native, tiny_model, golden, expert):
    """A ModelPatcher weight patch (the LoRA mechanism) on the understanding expert (text prefix) or the
    generation expert (latent steps) changes the result exactly as editing that weight in the library does."""
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    layer = "mlp" if expert == "und" else "mlp_moe_gen"
    key = f"diffusion_model.llm.language_model.model.layers.0.{layer}.down_proj.weight"
    base = tiny_model.patcher
    weight = base.model.state_dict()[key]
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    plain, inputs, settings = t2i_run(native, tiny_model, golden, steps=3)
    patched_model = base.clone()
    assert patched_model.add_patches({key: (delta,)}, 1.0) == [key]
    patched, _, _ = t2i_run(native, tiny_model, golden, model=core_model_from(native, patched_model, hp), steps=3)
    library = library_with_weight_edit(tiny_model, weight, delta, inputs, settings)
    change = (patched - plain).abs().max().item()
    print(f"[native] weight patch on the {expert} expert: output change {change:.3e}")
    assert change > 1e-3
    assert_close(patched, library, golden.tolerance("out/latent.0"), f"patched native vs edited library ({expert})")
    again, _, _ = t2i_run(native, tiny_model, golden, steps=3)
    assert_close(again, plain, 0.0, "unpatched run after the patched one")


def core_model_from(native, patcher, hp):
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    (model,) = ModelSamplingAuraFlow().patch_aura(patcher, hp["timestep_shift"])
    lo, hi = hp["cfg_interval"]
    return native.LanceGuidance.execute(model, lo, hi, hp["cfg_renorm_type"], hp["cfg_renorm_min"]).args[0]


def test_native_progress_and_interrupt(native, tiny_model, golden):
    """Core's sampler callback drives the progress bar (ComfyUI's interrupt check runs in its hook): an interrupt
    after the first step stops sampling and the next run still works."""
    import comfy.model_management
    import comfy.utils
    seen = []

    def hook(value, total, preview, *args, **kwargs):
        # newer hosts throttle the updates after the first (100 ms): interrupt at the first one
        seen.append((value, total))
        raise comfy.model_management.InterruptProcessingException()
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            t2i_run(native, tiny_model, golden, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert seen == [(1, 5)], "sampling went on after the interrupt"
    out, _, _ = t2i_run(native, tiny_model, golden, steps=2)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- bad input
def test_native_rejects_foreign_conditioning(native, tiny_model, golden):
    from comfy_extras.nodes_custom_sampler import (
        CFGGuider,
        KSamplerSelect,
        SamplerCustomAdvanced,
    )

    from lance_nodes.errors import InputError
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    pipe = tiny_model.pipe
    inputs = pipe.prepare_text_to_image(hp["caption"], hp["video_width"], hp["video_height"])
    positive, _, latent, _ = native.build_conditioning(pipe, inputs)
    foreign = [[torch.zeros(1, 4, 8), {"pooled_output": None}]]
    model = core_model(native, tiny_model, hp)
    (guider,) = CFGGuider().get_guider(model, positive, foreign, 4.0)
    (sampler,) = KSamplerSelect().get_sampler("euler")
    noise = native.LanceNoiseNode.execute(1, positive).args[0]
    with pytest.raises(InputError, match="Lance Conditioning"):
        SamplerCustomAdvanced().sample(noise, guider, sampler, native.LanceScheduler.execute(model, 2).args[0], latent)


def test_native_noise_rejects_a_foreign_latent(native, tiny_model, golden):
    from lance_nodes.errors import InputError
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    inputs = tiny_model.pipe.prepare_text_to_image(hp["caption"], hp["video_width"], hp["video_height"])
    positive, _, _, _ = native.build_conditioning(tiny_model.pipe, inputs)
    noise = native.LanceNoiseNode.execute(1, positive).args[0]
    with pytest.raises(InputError, match="latent_image"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 8, 8)})


def test_native_nodes_registered_with_the_extension(comfy):
    import asyncio

    from lance_nodes import NATIVE_NODE_IDS, entry
    ids = [n.define_schema().node_id for n in asyncio.run(entry.LanceExtension().get_node_list())]
    assert ids[-len(NATIVE_NODE_IDS):] == list(NATIVE_NODE_IDS)


# ---------------------------------------------------------------- negative prompts (both paths) and the nodes
NEGATIVE = "blurry, low quality"


def library_kwargs(hp):
    return dict(steps=hp["steps"], shift=hp["timestep_shift"], cfg_scale=hp["cfg_text_scale"],
                cfg_interval=tuple(hp["cfg_interval"]), cfg_renorm=hp["cfg_renorm_type"],
                cfg_renorm_min=hp["cfg_renorm_min"], seed=hp["validation_noise_seed"], decode=False)


def test_native_parity_negative_prompt_through_the_conditioning_node(native, tiny_model, golden):
    """Lance Conditioning (t2i, negative prompt) -> core sampler == the library with the same negative prompt."""
    name = golden.tasks("t2i", *GEN_TASKS)[0]
    hp = golden.hyper(name)
    w, h = hp["video_width"], hp["video_height"]
    positive, negative, latent, image_negative = native.LanceConditioning.execute(tiny_model, "t2i", hp["caption"], NEGATIVE, w, h,
                                                                  1, "auto", 1).args
    ours = sample_custom_advanced(native, core_model(native, tiny_model, hp), positive, negative, latent, hp)
    library = tiny_model.pipe.text_to_image(hp["caption"], width=w, height=h, negative_prompt=NEGATIVE,
                                            **library_kwargs(hp)).latents
    plain = tiny_model.pipe.text_to_image(hp["caption"], width=w, height=h, **library_kwargs(hp)).latents
    assert_close(ours, library, golden.tolerance("out/latent.0"), "native vs library with a negative prompt")
    assert (ours - plain).abs().max() > 1e-3


def test_all_in_one_nodes_take_a_negative_prompt(nodes, tiny_model, golden):
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    gen = sampling_widgets(steps=2, seed=42)
    size = (hp["video_width"], hp["video_height"])
    run = lambda **kw: nodes.LanceT2I.execute(tiny_model, hp["caption"], *size, **gen, **kw).args[0]["samples"]
    plain = run()
    assert torch.equal(run(negative_prompt=""), plain)
    with_negative = run(negative_prompt=NEGATIVE)
    library = tiny_model.pipe.text_to_image(hp["caption"], width=size[0], height=size[1], negative_prompt=NEGATIVE,
                                            steps=2, decode=False).raw_latents
    assert (with_negative - plain).abs().max() > 1e-3
    assert_close(with_negative, library, 1e-5, "LanceT2I negative prompt vs the library")
    image = torch.rand(1, 64, 64, 3)
    edited = nodes.LanceEdit.execute(tiny_model, image, "make it red", "image_256res", **gen,
                                     negative_prompt=NEGATIVE).args[0]["samples"]
    assert torch.isfinite(edited).all()


@pytest.mark.parametrize("task", ["t2v", "image_edit", "video_edit"])
def test_native_conditioning_node_matches_the_library_request(native, tiny_model, golden, task):
    """The node builds the request the library's prepare_* builds (same packed sequence), and a LATENT of the
    target's size (i2v: frame 0 = the start image, masked)."""
    image = torch.rand(1, 64, 64, 3)
    video = torch.rand(5, 64, 64, 3)
    positive, negative, latent, image_negative = native.LanceConditioning.execute(
        tiny_model, task, "a cat", "", 64, 64, 5, "auto", 2, image=image if task != "video_edit" else None,
        video=video if task == "video_edit" else None).args
    from lance_nodes.native_model import request_of
    request = request_of(positive).inputs
    pipe = tiny_model.pipe
    if task == "t2v":
        expected = pipe.prepare_text_to_video("a cat", 64, 64, 5, start_image=image, resolution="video_480p")
        assert latent["noise_mask"][:, :, 0].eq(0).all() and latent["noise_mask"][:, :, 1:].eq(1).all()
    elif task == "image_edit":
        expected = pipe.prepare_edit(image, "a cat", video=False, resolution="image_768res")
    else:
        expected = pipe.prepare_edit(video, "a cat", video=True, resolution="video_480p")
    assert torch.equal(request.seq.ids, expected.seq.ids)
    grid = request.target
    assert latent["samples"].shape == (2, 48, grid.frames, grid.height, grid.width)
    uncond = request_of(negative, "negative")
    assert uncond.kind == "uncond" and uncond.dropped and uncond.inputs is request
    image_uncond = request_of(image_negative, "image_negative")
    # i2v has no media blocks (its start frame is part of the target): the negative stands in
    assert image_uncond.kind == ("uncond" if task == "t2v" else "image_uncond")


def test_native_model_node_needs_resident_memory(native, nodes, models_dir):
    from lance_nodes.errors import InputError
    (offload,) = nodes.LanceLoader.execute("tiny_copy", "auto", "auto", "auto", "offload").args
    with pytest.raises(InputError, match="resident"):
        native.LanceModelNode.execute(offload)


# ---------------------------------------------------------------- core VAEDecode, hook patches
def test_native_ksampler_latent_decodes_with_core_vae_decode(native, nodes, tiny_model, golden, comfy):
    """Lance Conditioning -> KSampler(lance_flow) -> core VAEDecode with Lance Model's VAE gives exactly Lance
    Decode's pixels, and core's own Wan2.2 VAE (the release file through VAELoader) gives them within 1e-3."""
    import nodes as core_nodes
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    positive, negative, latent, image_negative = native.LanceConditioning.execute(
        tiny_model, "t2i", hp["caption"], "", hp["video_width"], hp["video_height"], 1, "auto", 1).args
    (out,) = core_nodes.KSampler().sample(core_model(native, tiny_model, hp), 7, 3, 4.0, "euler", "lance_flow",
                                          positive, negative, latent)
    vae = native.LanceModelNode.execute(tiny_model).args[1]
    (decoded,) = core_nodes.VAEDecode().decode(vae, out)
    (lance,) = nodes.LanceDecode.execute(tiny_model, out).args
    assert decoded.shape == lance.shape == (1, hp["video_height"], hp["video_width"], 3)
    assert torch.equal(decoded, lance)
    (core_decoded,) = core_nodes.VAEDecode().decode(core_wan22_vae(comfy), out)
    err = (core_decoded.float() - lance).abs().max().item()
    print(f"[native] core's own Wan2.2 VAEDecode vs Lance Decode of a native LATENT: max_abs={err:.2e}")
    assert err < 1e-3


def test_native_prefix_rebuilt_per_call_under_hook_patches(native, tiny_model, golden):
    """With scheduled hook patches the weights may change between steps, so the prefix cache is not kept."""
    import comfy.patcher_extension  # noqa: F401

    from lance_model.tasks.branches import Branch
    from lance_nodes.native_model import COND_KEY, CONDLance
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    base = tiny_model.patcher.model
    inputs = tiny_model.pipe.prepare_text_to_image(hp["caption"], hp["video_width"], hp["video_height"])
    grid = inputs.target
    x = torch.zeros(1, 48, grid.frames, grid.height, grid.width)
    sigma = torch.tensor([1.0])
    cond = {COND_KEY: [CONDLance(Branch(inputs)).cond], "transformer_options": {"cond_or_uncond": [0]}}

    class Hooked:
        hook_patches = {"hook": {}}

        def is_dynamic(self):   # newer hosts ask the current patcher
            return False
    engine = base.diffusion_model.engine

    def caches(patcher):
        base.current_patcher = patcher
        seen = []
        for _ in range(2):
            base.apply_model(x, sigma, **cond)
            seen.append(engine.cache)
        return seen
    try:
        first, second = caches(None)
        assert first is second, "without hooks the prefix is built once per run"
        first, second = caches(Hooked())
        assert first is not second, "with hook patches the prefix is rebuilt for every call"
    finally:
        base.current_patcher = None


def test_native_prefix_cache_lives_for_one_run(native, tiny_model, golden):
    """Built during sampling (one prefill per branch), dropped when core's run ends (ModelPatcher.cleanup)."""
    import comfy.patcher_extension
    engine = tiny_model.patcher.model.diffusion_model.engine
    tiny_model.pipe.prefixes.clear()   # nothing stored: every branch is prefilled
    seen = []

    def probe(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append((engine.cache is not None, engine.prefills))
        return out
    model = core_model(native, tiny_model, golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])).clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_probe", probe)
    t2i_run(native, tiny_model, golden, model=model, steps=3)
    assert len(seen) == 3 and all(built for built, _ in seen)
    assert seen[-1][1] == 2, "one prefill per branch (cond, uncond) for the whole run"
    assert engine.cache is None


# ---------------------------------------------------------------- the shipped native workflows, in process
NATIVE_WORKFLOWS = ["native_t2i", "native_i2v", "native_image_edit"]


def run_api_graph(workflow: dict, classes: dict) -> dict:
    """Execute an API-format graph node by node (inputs resolved through their links)."""
    outputs = {}

    def run(key):
        if key not in outputs:
            node = workflow[key]
            kwargs = {name: run(v[0])[v[1]] if isinstance(v, list) else v for name, v in node["inputs"].items()}
            outputs[key] = classes[node["class_type"]](**kwargs)
        return outputs[key]
    for key in workflow:
        run(key)
    return outputs


@pytest.mark.parametrize("name", NATIVE_WORKFLOWS)
def test_native_workflow_runs_with_core_vae_decode(native, nodes, tiny_model, comfy, name):
    """The shipped native API workflow (tiny sizes/steps): Lance nodes + core KSampler or SamplerCustomAdvanced,
    core VAEDecode with Lance Model's VAE, saving an image or video; nothing but the Lance release is needed."""
    import json

    import nodes as core_nodes
    from comfy_extras.nodes_custom_sampler import (
        CFGGuider,
        KSamplerSelect,
        SamplerCustomAdvanced,
    )

    from tests.fixtures.comfy_env import REPO_ROOT, TINY_NAME
    from tests.fixtures.tiny_workflows import OVERRIDES
    workflow = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    for node in workflow.values():
        node["inputs"].update({k: v for k, v in OVERRIDES.get(node["class_type"], {}).items() if k in node["inputs"]})
    assert {n["inputs"]["model_name"] for n in workflow.values() if n["class_type"] == "LanceLoader"} == {TINY_NAME}
    saved = []
    lance = {cls.define_schema().node_id: cls for cls in [*nodes.NODES, *native.NATIVE_NODES]}
    classes = {node_id: (lambda cls: lambda **kw: cls.execute(**kw).args)(cls) for node_id, cls in lance.items()}
    classes.update({
        "KSampler": lambda **kw: core_nodes.KSampler().sample(**kw),
        "SamplerCustomAdvanced": lambda **kw: SamplerCustomAdvanced().sample(**kw),
        "CFGGuider": lambda **kw: CFGGuider().get_guider(**kw),
        "KSamplerSelect": lambda **kw: KSamplerSelect().get_sampler(**kw),
        "VAEDecode": lambda **kw: core_nodes.VAEDecode().decode(**kw),
        "LoadImage": lambda image: (golden_image(), None),
        "CreateVideo": lambda images, fps, audio=None: (images,),
        "SaveImage": lambda images, filename_prefix: saved.append(images) or (),
        "SaveVideo": lambda video, filename_prefix, **kw: saved.append(video) or (),
    })
    run_api_graph(workflow, classes)
    assert len(saved) == 1
    frames = saved[0]
    expected_frames = 5 if name == "native_i2v" else 1
    assert frames.shape[0] == expected_frames and frames.shape[-1] == 3 and torch.isfinite(frames).all()


def test_native_lora_file_format_through_core_loader(native, tiny_model, golden):
    """A LoRA in the common `lora_unet_<module path>` format, applied by core's load_lora_for_models (what
    LoraLoaderModelOnly calls), equals editing the weight by up @ down in the library."""
    import comfy.sd
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    module = "llm.language_model.model.layers.0.self_attn.q_proj_moe_gen"
    weight = tiny_model.patcher.model.state_dict()[f"diffusion_model.{module}.weight"]
    generator = torch.Generator().manual_seed(1)
    up, down = torch.randn(weight.shape[0], 2, generator=generator), torch.randn(2, weight.shape[1], generator=generator)
    name = "lora_unet_" + module.replace(".", "_")
    lora = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    plain, inputs, settings = t2i_run(native, tiny_model, golden, steps=3)
    patched_patcher, _ = comfy.sd.load_lora_for_models(tiny_model.patcher, None, lora, 0.5, 0.0)
    patched, _, _ = t2i_run(native, tiny_model, golden, model=core_model_from(native, patched_patcher, hp), steps=3)
    library = library_with_weight_edit(tiny_model, weight, 0.5 * (up @ down), inputs, settings)
    print(f"[native] LoRA (lora_unet_ keys, strength 0.5): output change {(patched - plain).abs().max():.3e}")
    assert (patched - plain).abs().max() > 1e-3
    assert_close(patched, library, golden.tolerance("out/latent.0"), "native LoRA vs edited library")


# ---------------------------------------------------------------- image CFG (Lance Edit Guider)
def edit_guider_run(native, tiny_model, golden, image_cfg):
    """The image_edit fixture's request through SamplerCustomAdvanced with the Lance Edit Guider."""
    import comfy.latent_formats
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustomAdvanced
    pipe, hp = tiny_model.pipe, golden.hyper("image_edit")
    settings = settings_for(golden, "image_edit", decode=False)
    inputs = prepare(pipe, golden, "image_edit", settings)
    positive, negative, latent, image_negative = native.build_conditioning(pipe, inputs)
    model = core_model(native, tiny_model, hp, guidance=False)
    lo, hi = hp["cfg_interval"]
    guider = native.LanceEditGuiderNode.execute(model, positive, negative, image_negative, hp["cfg_text_scale"],
                                                image_cfg, lo, hi, hp["cfg_renorm_type"], hp["cfg_renorm_min"]).args[0]
    sigmas = native.LanceScheduler.execute(model, hp["steps"]).args[0]
    noise = native.LanceNoiseNode.execute(hp["validation_noise_seed"], positive).args[0]
    (sampler,) = KSamplerSelect().get_sampler("euler")
    out, _ = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    return comfy.latent_formats.Wan22().process_in(out["samples"]), inputs, settings


def test_native_edit_guider_image_cfg_matches_the_library(native, tiny_model, golden):
    if "image_edit" not in golden.manifest["fixtures"]:
        pytest.skip("no image_edit fixture in this set")
    ours, inputs, settings = edit_guider_run(native, tiny_model, golden, 1.6)
    settings.image_cfg_scale = 1.6
    library = tiny_model.pipe.generate("image_edit", "x", inputs, settings).latents
    assert_close(ours, library, golden.tolerance("out/latent.0"), "Lance Edit Guider vs library, image CFG 1.6")
    plain = tiny_model.pipe.generate("image_edit", "x", inputs, settings_for(golden, "image_edit", decode=False)).latents
    assert (library - plain).abs().max() > 1e-3, "image CFG 1.6 should change the edit"


def test_native_edit_guider_at_image_cfg_one_is_text_cfg(native, tiny_model, golden):
    if "image_edit" not in golden.manifest["fixtures"]:
        pytest.skip("no image_edit fixture in this set")
    ours, _, _ = edit_guider_run(native, tiny_model, golden, 1.0)
    fx = golden.tensors("image_edit")
    key = "out/latent.1" if "out/latent.1" in fx else "out/latent.0"
    assert_close(ours[0].permute(1, 2, 3, 0), fx[key], golden.tolerance(key), "Lance Edit Guider, image CFG 1")


def test_native_edit_guider_refuses_image_cfg_without_media(native, tiny_model):
    from lance_nodes.errors import InputError
    positive, negative, _, image_negative = native.LanceConditioning.execute(
        tiny_model, "t2i", "a cat", "", 64, 64, 1, "auto", 1).args
    model = native.LanceModelNode.execute(tiny_model).args[0]
    with pytest.raises(InputError, match="image_negative"):
        native.LanceEditGuiderNode.execute(model, positive, negative, image_negative, 4.0, 1.5, 0.4, 1.0, "global", 0.0)
    with pytest.raises(InputError, match="image_cfg"):
        native.LanceEditGuiderNode.execute(model, positive, negative, image_negative, 4.0, float("nan"), 0.4, 1.0,
                                           "global", 0.0)


def k_proj_lora(tiny_model, seed: int):
    """A clone of the loaded model's patcher with a random rank-2 LoRA (lora_unet_ keys) on layer 0's k_proj,
    loaded through core's LoRA loader."""
    import comfy.sd
    module = "llm.language_model.model.layers.0.self_attn.k_proj"
    weight = tiny_model.patcher.model.state_dict()[f"diffusion_model.{module}.weight"]
    generator = torch.Generator().manual_seed(seed)
    name = "lora_unet_" + module.replace(".", "_")
    lora = {f"{name}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=generator),
            f"{name}.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator)}
    patched, _ = comfy.sd.load_lora_for_models(tiny_model.patcher, None, lora, 1.0, 0.0)
    return patched


def test_all_in_one_prefix_reuse_survives_a_lora_run(native, nodes, tiny_model, golden):
    """The all-in-one nodes keep the last request's prefixes (lance_model/runtime/prefix_store.py), keyed on the weight
    patches core has applied: a LoRA run on the shared weights in between changes nothing for them."""
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    gen = sampling_widgets(steps=2, seed=42)
    run = lambda: nodes.LanceT2I.execute(tiny_model, hp["caption"], hp["video_width"], hp["video_height"],
                                         **gen).args[0]["samples"]
    first = run()
    patched_patcher = k_proj_lora(tiny_model, seed=2)
    t2i_run(native, tiny_model, golden, model=core_model_from(native, patched_patcher, hp), steps=2)
    hits = tiny_model.pipe.prefixes.hits
    again = run()
    assert tiny_model.pipe.prefixes.hits == hits + 2, "the unpatched request should reuse its prefixes"
    assert torch.equal(again, first)


def test_native_repeated_prompt_reuses_its_prefixes_until_a_lora_changes_the_weights(native, tiny_model, golden):
    """The native path and the all-in-one nodes share the session's prefix store: the same prompt sampled again
    through core prefills nothing (same latents); a LoRA on the shared weights is another weights version, so its
    run prefills again; the plain prompt after it still reuses its own prefixes."""
    import comfy.patcher_extension
    import comfy.sd
    engine = tiny_model.patcher.model.diffusion_model.engine
    hp = golden.hyper(golden.tasks("t2i", *GEN_TASKS)[0])
    tiny_model.pipe.prefixes.clear()

    def run(patcher=None):
        """(latents, prefixes prefilled during the run)"""
        counts = []

        def probe(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            counts.append(engine.prefills)
            return out
        model = (core_model(native, tiny_model, hp) if patcher is None else core_model_from(native, patcher, hp)).clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_probe", probe)
        latents, _, _ = t2i_run(native, tiny_model, golden, model=model, steps=2)
        return latents, counts[-1]

    first, prefilled = run()
    assert prefilled == 2, "a new prompt prefills cond and uncond"
    again, prefilled = run()
    assert prefilled == 0, "the repeated prompt restores both prefixes from the store"
    assert torch.equal(again, first)
    patched_patcher = k_proj_lora(tiny_model, seed=3)
    with_lora, prefilled = run(patched_patcher)
    assert prefilled == 2, "with a LoRA applied the prefixes are computed again"
    assert (with_lora - first).abs().max() > 1e-4
    plain, prefilled = run()
    assert prefilled == 0 and torch.equal(plain, first)
