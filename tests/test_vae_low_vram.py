"""Lance's VAE under ComfyUI's low-VRAM handling (12-16 GB cards), as core's own VAE behaves there:

- a VAE-only call (core VAEDecode / VAEEncode on Lance Model's VAE, Lance Decode) loads nothing but the VAE, and
  the room it asks core for may come from Lance's own LLM too;
- VAE (and ViT) weights that core's partial load left in RAM visit the device only while their stage runs, count
  in the memory estimate, and are back where core had them afterwards;
- out of memory untiled -> a tiled retry after freeing -> a clear OutOfMemory; tiled asked for -> no retry.

The placement tests are rehearsals of a GPU situation on the CPU: torch's lazy tensors (TorchScript backend, on the
CPU) keep their values on a second device, `lazy:0`, which stands in for the GPU; the CPU is the RAM.
"""
import re

import pytest
import torch

from tests.fixtures.comfy_env import GOLDEN_DIR, TINY_NAME

OOM = "CUDA out of memory (injected)"
OOM_ = re.escape(OOM)


@pytest.fixture(scope="module")
def core_vae(comfy, tiny_model):
    from lance_nodes.native_vae import LanceCoreVAE
    return LanceCoreVAE(tiny_model)


def tiled_side(vae, tiles: float) -> int:
    """A latent side `tiles` VAE tiles wide: tiled and untiled VAE passes give different pixels above one tile
    (decoder) or two (encoder: it tiles after its 2x2 patchify)."""
    from lance_model.runtime.memory import TILE_SIDE
    return int(TILE_SIDE * tiles) // vae.spatial_factor


@pytest.fixture(scope="module")
def latent(tiny_model) -> dict:
    vae = tiny_model.pipe.vae
    side = tiled_side(vae, 1.5)
    return {"samples": torch.randn(1, vae.z_dim, 1, side, side, generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module")
def pixels(tiny_model) -> torch.Tensor:
    vae = tiny_model.pipe.vae
    side = tiled_side(vae, 2.5) * vae.spatial_factor
    return torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(0))


def out_of_memory(vae, method: str, calls: list, tiled_too: bool):
    """`vae.<method>` raising torch's out-of-memory error when untiled (and tiled too, if asked); `calls` gets
    whether the VAE was tiled at each call."""
    original = getattr(type(vae), method)

    def run(*args):
        calls.append(vae.tiling_enabled)
        if tiled_too or not vae.tiling_enabled:
            raise torch.OutOfMemoryError(OOM)
        return original(vae, *args)
    return run


# ---------------------------------------------------------------- what a VAE-only call loads and frees
def test_vae_only_calls_load_nothing_but_a_generation_loads_the_model(core_vae, nodes, tiny_model, latent, pixels,
                                                                       monkeypatch):
    import comfy.model_management as mm
    import nodes as core_nodes
    loaded = []
    load = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: (loaded.append(models), load(models, *a, **k)))
    core_nodes.VAEDecode().decode(core_vae, latent)
    core_nodes.VAEDecodeTiled().decode(core_vae, latent, 256, 64, 64, 8)
    core_nodes.VAEEncode().encode(core_vae, pixels)
    nodes.LanceDecode.execute(tiny_model, latent)
    assert loaded == []
    nodes.LanceT2I.execute(tiny_model, "a red cat", 64, 64, steps=2, shift=3.5, cfg_scale=4.0, cfg_interval_start=0.4,
                           cfg_interval_end=1.0, cfg_renorm="global", cfg_renorm_min=0.0, seed=1, batch_size=1)
    assert loaded == [[tiny_model.patcher]]


def test_a_vae_only_call_lets_core_free_this_model_too_then_retries_tiled(core_vae, tiny_model, latent, monkeypatch):
    """The estimate does not fit: core is asked for room keeping no model loaded (Lance's LLM may go), untiled and
    then tiled; still short -> a clear OutOfMemory saying what to do."""
    import comfy.model_management as mm
    import nodes as core_nodes

    import lance_model.runtime.memory as memory
    from lance_nodes.errors import OutOfMemory
    asked = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=(): asked.append((need, list(keep_loaded))))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(OutOfMemory, match=r"VAE decode ran out of memory .* untiled \(not enough memory.* and tiled "
                                          r"\(not enough memory.*To run it in less memory: set the Lance Loader"):
        core_nodes.VAEDecode().decode(core_vae, latent)
    assert len(asked) == 2 and asked[1][0] < asked[0][0]      # the tiled estimate is the smaller one
    assert all(keep == [] for _, keep in asked)


# ---------------------------------------------------------------- out of memory: tiled retry, then a clear error
def test_core_vae_decode_out_of_memory_retries_tiled_then_fails_clearly(core_vae, tiny_model, latent, monkeypatch):
    import nodes as core_nodes

    from lance_nodes.errors import OutOfMemory
    pipe = tiny_model.pipe
    untiled = pipe.decode_raw_latents(latent["samples"])
    tiled = pipe.decode_raw_latents(latent["samples"], tiled=True)
    assert not torch.equal(untiled, tiled)   # the retry's pixels are recognisable
    calls = []
    monkeypatch.setattr(pipe.vae, "decode", out_of_memory(pipe.vae, "decode", calls, tiled_too=False))
    (decoded,) = core_nodes.VAEDecode().decode(core_vae, latent)
    assert calls == [False, True] and not pipe.vae.tiling_enabled
    assert torch.equal(decoded, tiled.reshape(decoded.shape))

    calls.clear()
    monkeypatch.setattr(pipe.vae, "decode", out_of_memory(pipe.vae, "decode", calls, tiled_too=True))
    with pytest.raises(OutOfMemory, match=rf"VAE decode ran out of memory on cpu, untiled \({OOM_}\) and tiled "
                                          rf"\({OOM_}\) \(Lance Loader: .* still loaded and usable"):
        core_nodes.VAEDecode().decode(core_vae, latent)
    assert calls == [False, True] and not pipe.vae.tiling_enabled
    monkeypatch.undo()
    (again,) = core_nodes.VAEDecode().decode(core_vae, latent)
    assert torch.equal(again, untiled.reshape(again.shape))


def test_a_tiled_decode_asked_for_is_not_retried(core_vae, nodes, tiny_model, latent, monkeypatch):
    import nodes as core_nodes

    from lance_nodes.errors import OutOfMemory
    vae, calls = tiny_model.pipe.vae, []
    monkeypatch.setattr(vae, "decode", out_of_memory(vae, "decode", calls, tiled_too=True))
    with pytest.raises(OutOfMemory, match=rf"ran out of memory on cpu, tiled \({OOM_}\) \(Lance Loader"):
        core_nodes.VAEDecodeTiled().decode(core_vae, latent, 256, 64, 64, 8)
    assert calls == [True]
    calls.clear()
    with pytest.raises(OutOfMemory, match=rf"untiled \({OOM_}\) and tiled \({OOM_}\)"):   # the Lance Decode node too
        nodes.LanceDecode.execute(tiny_model, latent)
    assert calls == [False, True]


def test_core_vae_encode_out_of_memory_retries_tiled(core_vae, tiny_model, pixels, monkeypatch):
    import nodes as core_nodes
    pipe = tiny_model.pipe
    tiled = pipe.encode_raw_latents(pixels, tiled=True)
    assert not torch.equal(tiled, pipe.encode_raw_latents(pixels))
    pipe.encodings.clear()      # the retry must encode again, not find the stored posterior
    calls = []
    monkeypatch.setattr(pipe.vae, "encode", out_of_memory(pipe.vae, "encode", calls, tiled_too=False))
    (latent,) = core_nodes.VAEEncode().encode(core_vae, pixels)
    assert calls == [False, True] and not pipe.vae.tiling_enabled
    assert torch.equal(latent["samples"], tiled)


# ---------------------------------------------------------------- rehearsals: weights core's partial load left in RAM
def placement(module: torch.nn.Module) -> dict:
    return {name: tensor.device for name, tensor in [*module.named_parameters(), *module.named_buffers()]}


def tensors_bytes(module: torch.nn.Module, names) -> int:
    tensors = dict([*module.named_parameters(), *module.named_buffers()])
    return sum(tensors[name].numel() * tensors[name].element_size() for name in names)


@pytest.fixture
def partially_loaded(comfy, models_dir, second_device):
    """A private tiny model that core loaded partially onto the second device (half the model's bytes: the largest
    layers first; layers not built from comfy.ops that do not fit stay in RAM, as core leaves our ViT and VAE)."""
    from lance_nodes import runtime
    model = runtime._load(TINY_NAME, runtime.resolve_model_path(TINY_NAME), "auto", "auto", "auto", "resident",
                          "default")
    patcher = model.patcher
    patcher.patch_model(device_to=second_device, lowvram_model_memory=patcher.model_size() // 2)
    model.pipe.session.device = second_device
    for module in (model.pipe.session.vit_module, model.pipe.session.vae_module):
        devices = set(placement(module).values())
        assert devices == {second_device, torch.device("cpu")}, f"core's partial load did not split {devices}"
    yield model
    patcher.detach()


def test_rehearsal_core_vae_decode_after_a_partial_load(partially_loaded, latent, monkeypatch):
    """Core VAEDecode loads nothing (the LLM stays as core left it), brings the VAE's RAM part to the device for the
    decode only, counts its bytes in the estimate, and leaves every weight where core had it."""
    import nodes as core_nodes

    from lance_nodes.native_vae import LanceCoreVAE
    pipe, patcher = partially_loaded.pipe, partially_loaded.patcher
    session, device = pipe.session, pipe.session.device
    before = placement(patcher.model)
    in_ram = [name for name, where in placement(session.vae_module).items() if where.type == "cpu"]
    estimates, during = [], []
    check = session.check
    monkeypatch.setattr(session, "check", lambda estimate: (estimates.append(estimate), check(estimate))[1])

    def decode(latents):   # the lazy backend does not run the whole VAE: where its weights are is what counts here
        during.append(set(placement(session.vae_module).values()))
        b, _, t, h, w = latents.shape
        return torch.zeros(b, 3, pipe.vae.temporal_factor * (t - 1) + 1, h * pipe.vae.spatial_factor,
                           w * pipe.vae.spatial_factor)
    monkeypatch.setattr(pipe.vae, "decode", decode)
    core_nodes.VAEDecode().decode(LanceCoreVAE(partially_loaded), latent)
    assert during == [{device}]
    assert estimates[0].stages["VAE decode"]["VAE weights"] == tensors_bytes(session.vae_module, in_ram) > 0
    assert placement(patcher.model) == before


def test_rehearsal_a_vit_left_in_ram_visits_the_device_only_while_it_runs(partially_loaded):
    session = partially_loaded.pipe.session
    before = placement(session.vit_module)
    in_ram = [name for name, where in before.items() if where.type == "cpu"]
    assert session.stage_weights(session.vit_module) == tensors_bytes(session.vit_module, in_ram)
    with session.running(session.vit_module):
        assert set(placement(session.vit_module).values()) == {session.device}
        assert session.stage_weights(session.vit_module) == 0
    assert placement(session.vit_module) == before


def test_rehearsal_vae_weights_a_host_sends_off_to_make_room_are_counted(second_device, monkeypatch):
    """A host making room for a VAE-only call may unload this model, VAE included (core: smallest layers first):
    those weights come back for the decode, so the estimate is checked again with them and the host asked for as
    much more."""
    import lance_model.runtime.memory as memory
    from lance_model import load_lance
    pipe = load_lance(GOLDEN_DIR / "checkpoint", dtype="fp32", device="cpu")
    session = pipe.session
    session.device = second_device
    session.vae_module.to(second_device)
    decoder = [f"decoder.{name}" for name in placement(session.vae_module.decoder)]
    free, asked = {"bytes": 0}, []

    def make_room(need, device, scope):
        asked.append((need, scope))
        if len(asked) == 1:
            session.vae_module.decoder.to("cpu")   # the host unloads this model's smallest layers
        free["bytes"] = need
    session.make_room = make_room
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    during = []
    monkeypatch.setattr(pipe.vae, "decode", lambda latents: (during.append(set(placement(session.vae_module).values())),
                                                             torch.zeros(1, 3, 1, 16, 16))[1])
    pipe.decode_latents(torch.zeros(1, pipe.vae.z_dim, 1, 1, 1))
    assert [scope for _, scope in asked] == ["vae", "vae"]
    assert asked[1][0] - asked[0][0] == tensors_bytes(session.vae_module, decoder) > 0
    assert during == [{second_device}]
    assert set(placement(session.vae_module.decoder).values()) == {torch.device("cpu")}   # where the host put it


@pytest.mark.parametrize("memory", ["resident", "offload"])
def test_rehearsal_weights_off_the_device_visit_it_while_their_stage_runs(second_device, memory):
    """The library alone: ViT and VAE weights off the execution device (left by a host, or kept in RAM by offload
    mode) visit it while their stage runs and go back; the LLM visits only in offload mode (otherwise a host manages
    its placement layer by layer)."""
    from lance_model import load_lance
    session = load_lance(GOLDEN_DIR / "checkpoint", dtype="fp32", device="cpu", memory=memory).session
    session.device = second_device
    for module in (session.llm, session.vit_module, session.vae_module):
        before = placement(module)
        with session.running(module):
            during = set(placement(module).values())
        assert placement(module) == before
        stays = module is session.llm and memory == "resident"
        assert during == ({torch.device("cpu")} if stays else {second_device})
