"""Where the weights live (lance_model/runtime/vram_plan.py, streaming.py, fp8.py), checked on the CPU:

* streamed weights (`-k stream`) give results bit-identical to resident ones (the same slot machinery that
  copies on a side CUDA stream on a GPU copies synchronously here);
* fp8 storage (`-k fp8`) passes the quality gate on the tiny fixtures: decoded-pixel PSNR >= 35 dB against the
  unquantized model for t2i and image_edit with the understanding expert in fp8, and no clear greedy choice
  changed over 64 understanding tokens (bench/bench_fp8.py measures the same on the mid-size release);
* the plan a budget picks, for the release's weight sizes and for the tiny model through `load_lance`;
* a decode that runs out of memory after sampling loses nothing (retried tiled; else the latents are kept).
"""
from __future__ import annotations

import math

import pytest
import torch

from lance_model import DecodeOutOfMemory, load_lance
from lance_model.runtime.memory import GIB
from lance_model.runtime.vram_plan import DEVICE_MARGIN, VramPlan, WeightBytes, candidates, choose_plan
from tests.helpers import forced_logits, x2t_request

STEPS = dict(steps=3, seed=1)
SMALL = dict(width=64, height=64, **STEPS)
PSNR_GATE_DB = 35.0


def loaded(golden, **options):
    return load_lance(golden.checkpoint, dtype="fp32", device="cpu", **options)


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((frames - reference) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def edit(pipe, golden):
    return pipe.edit_image(golden.input_media("image_edit"), "make the sky red", resolution="image_256res", **STEPS)


# ---------------------------------------------------------------- streamed weights
def test_stream_results_equal_resident_bit_for_bit(pipe, golden):
    streamed = loaded(golden, memory="stream")
    assert streamed.plan == VramPlan(stream=("und", "gen"), stages=True)
    assert streamed.session.streamer.slot_bytes > 0
    for run in (lambda p: p.text_to_image("a red cat", **SMALL), lambda p: edit(p, golden)):
        ours, reference = run(streamed), run(pipe)
        assert torch.equal(ours.latents, reference.latents) and torch.equal(ours.frames, reference.frames)
    instruction, question = x2t_request(golden, "x2t_image")
    ours = streamed.understand(golden.input_media("x2t_image"), question, instruction=instruction, max_new_tokens=8,
                               return_logits=True)
    reference = pipe.understand(golden.input_media("x2t_image"), question, instruction=instruction, max_new_tokens=8,
                                return_logits=True)
    assert ours.token_ids == reference.token_ids and torch.equal(ours.logits, reference.logits)


def test_stream_leaves_no_layer_weights_bound_to_a_slot_between_runs(golden):
    streamed = loaded(golden, memory="stream")
    streamed.text_to_image("a red cat", **SMALL)
    streamer = streamed.session.streamer
    slots = [(slot.data_ptr(), slot.data_ptr() + slot.numel()) for stream in streamer.experts.values()
             for slot in stream.slots]
    params = [p for stream in streamer.experts.values() for layer in stream.params for p in layer]
    assert not any(start <= p.data_ptr() < end for p in params for start, end in slots)


def test_stream_copies_only_the_experts_a_pass_runs(golden):
    """An answer runs the understanding expert only: the generation expert is never copied. A denoising step
    runs the generation expert over the latents and the understanding expert over the two marker rows: both."""
    streamed = loaded(golden, memory="stream")
    streamer = streamed.session.streamer
    streamed.understand(None, "What is a cat?", max_new_tokens=4)
    assert streamer.copied_bytes["und"] > 0 and streamer.copied_bytes["gen"] == 0
    before = dict(streamer.copied_bytes)
    streamed.text_to_image("a red cat", **SMALL)
    assert all(streamer.copied_bytes[e] > before[e] for e in ("und", "gen"))


def test_stream_host_slabs_hold_the_weights_once(golden):
    """Each expert's weights of a layer are packed into one host slab (page-locked in place on CUDA), the
    parameters rebound into it: the slabs' bytes are the streamed weights' bytes plus alignment, and no parameter
    keeps its own storage beside its slab."""
    streamed = loaded(golden, memory="stream")
    streamer = streamed.session.streamer
    weights = sum(p.numel() * p.element_size() for stream in streamer.experts.values()
                  for layer in stream.params for p in layer)
    assert weights <= streamer.host_bytes <= 1.05 * weights + 256 * sum(
        len(layer) for stream in streamer.experts.values() for layer in stream.params)
    for stream in streamer.experts.values():
        for params, slab in zip(stream.params, stream.slabs):
            assert all(p.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr() for p in params)


# ---------------------------------------------------------------- fp8 storage and its quality gate
def test_fp8_understanding_expert_passes_the_gate(pipe, golden):
    fp8 = loaded(golden, fp8=("und",))
    assert fp8.plan == VramPlan(fp8=("und",))
    for name, run in (("t2i", lambda p: p.text_to_image("a red cat", **SMALL)), ("image_edit", lambda p: edit(p, golden))):
        ours, reference = run(fp8), run(pipe)
        error = ((ours.latents - reference.latents).norm() / reference.latents.norm()).item()
        quality = psnr(ours.frames, reference.frames)
        print(f"[fp8] understanding expert, {name}: final-latent relative error {error:.3e}, PSNR {quality:.1f} dB")
        assert quality >= PSNR_GATE_DB
    # greedy ids over 64 tokens, compared token by token with the reference's own answer fed back (teacher
    # forcing). A random tiny model's logits are nearly flat (hidden 64: a weight's fp8 rounding barely averages
    # out), so the plain agreement is printed, and the gate is that fp8 never changes a token the reference chose
    # by a clear margin (more than twice the largest logit change at that position)
    instruction, question = x2t_request(golden, "x2t_image")
    media = golden.input_media("x2t_image")
    answer = pipe.understand(media, question, instruction=instruction, max_new_tokens=64).token_ids
    reference, ours = (forced_logits(p, media, question, instruction, answer) for p in (pipe, fp8))
    assert reference.argmax(-1).tolist() == answer
    same = reference.argmax(-1) == ours.argmax(-1)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (ours - reference).abs().max(dim=-1).values
    print(f"[fp8] understanding expert, greedy ids (teacher-forced): {same.float().mean():.0%} of {len(answer)} "
          f"agree, {int(clear.sum())} clear choices all kept: {bool(same[clear].all())}; logits relative error "
          f"{((ours - reference).norm() / reference.norm()).item():.3f}")
    assert bool(same[clear].all())


def test_fp8_both_experts_stay_close(pipe, golden):
    fp8 = loaded(golden, fp8=("und", "gen"))
    ours, reference = fp8.text_to_image("a red cat", **SMALL), pipe.text_to_image("a red cat", **SMALL)
    quality = psnr(ours.frames, reference.frames)
    print(f"[fp8] both experts, t2i: PSNR {quality:.1f} dB")
    assert quality >= PSNR_GATE_DB


def test_fp8_streamed_equals_fp8_resident(golden):
    resident, streamed = loaded(golden, fp8=("und",)), loaded(golden, memory="stream", fp8=("und",))
    a, b = resident.text_to_image("a red cat", **SMALL), streamed.text_to_image("a red cat", **SMALL)
    assert torch.equal(a.latents, b.latents)


def test_fp8_storage_halves_the_expert_bytes(golden):
    from lance_model.nn.fp8 import Fp8Linear, expert_linears
    fp8 = loaded(golden, fp8=("gen",))
    linears = [linear for _, _, linear in expert_linears(fp8.llm, "gen")]
    assert linears and all(isinstance(linear, Fp8Linear) for linear in linears)
    assert all(linear.weight.element_size() == 1 for linear in linears)
    assert not any(isinstance(linear, Fp8Linear) for _, _, linear in expert_linears(fp8.llm, "und"))
    # never the embeddings, the LM head, the latent projections, the time embedder or a norm
    fp8 = loaded(golden, fp8=("und", "gen"))
    quantized = {id(m) for m in fp8.llm.modules() if isinstance(m, Fp8Linear)}
    experts = {id(linear) for e in ("und", "gen") for _, _, linear in expert_linears(fp8.llm, e)}
    assert quantized == experts
    outside = [fp8.llm.language_model.model.embed_tokens, fp8.llm.language_model.lm_head, fp8.llm.vae2llm,
               fp8.llm.llm2vae, *fp8.llm.time_embedder.modules(), *fp8.llm.language_model.model.norm.modules()]
    assert not any(isinstance(module, Fp8Linear) for module in outside)


def test_fp8_scale_applied_to_the_product_equals_the_dequantized_weight():
    """linear(x, w8) * scale (no scaled-weight temporary, the scale in fp32) equals linear(x, w8 * scale) within
    fp32 rounding."""
    from lance_model.nn.fp8 import Fp8Linear
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256, generator=generator) * torch.logspace(-3, 1, 96).view(-1, 1))
    fp8 = Fp8Linear(linear)
    x = torch.randn(7, 256, generator=generator)
    dequantized = fp8.weight.float() * fp8.weight_scale[:, None]
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, dequantized, linear.bias)
        ours = fp8(x)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


# ---------------------------------------------------------------- the plan a budget picks
# the release in bf16: each expert 36 layers x ~172 MB, embeddings + lm_head + heads ~1.3 GB, ViT 1.3, VAE 1.4
RELEASE = WeightBytes(und=int(6.2 * GIB), gen=int(6.2 * GIB), shared=int(1.3 * GIB), vit=int(1.3 * GIB),
                      vae=int(1.4 * GIB), layers=36)
IMAGE_WORK = int(1.5 * GIB)
RELEASE_IMAGE_RESERVE = int(1.54 * GIB)   # vram_plan.working_reserve of the release for a 768^2 image


def test_a_release_fits_resident_on_24_gib():
    assert choose_plan(24 * GIB, RELEASE, IMAGE_WORK) == VramPlan()


@pytest.mark.parametrize("index", range(len(candidates())))
def test_each_plan_is_chosen_where_it_is_the_fastest_that_fits(index):
    plan = candidates()[index]
    budget = RELEASE.device_bytes(plan) + IMAGE_WORK
    assert choose_plan(budget, RELEASE, IMAGE_WORK) == plan
    if index + 1 < len(candidates()):
        assert choose_plan(budget - 1, RELEASE, IMAGE_WORK) != plan


def test_plans_shrink_in_order_and_are_bit_exact_unless_fp8_is_asked():
    for fp8 in ((), ("und",), ("und", "gen")):
        plans = candidates(fp8)
        sizes = [RELEASE.device_bytes(plan) for plan in plans]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
        assert all(plan.fp8 == fp8 for plan in plans)
    assert all("fp8" not in plan.describe() for plan in candidates())
    assert "not been validated on the release's weights" in candidates(("und",))[0].describe()


def test_release_plan_per_card_is_the_issue_ladder():
    """The release's own weight sizes (bf16, built on the meta device by bench_gpu.release_architecture, as
    printed in docs/performance.md) and the reserve of a 768^2 image: 24 GB everything resident; 16 GB the LLM
    resident, ViT and VAE visiting; 12 GB the understanding expert streamed; 8 GB both experts streamed."""
    sizes = WeightBytes(und=int(5.17 * GIB), gen=int(5.17 * GIB), shared=int(1.17 * GIB), vit=int(1.25 * GIB),
                        vae=int(1.31 * GIB), layers=36)
    ladder = {24: VramPlan(), 16: VramPlan(stages=True), 12: VramPlan(stream=("und",), stages=True),
              8: VramPlan(stream=("und", "gen"), stages=True)}
    for card, plan in ladder.items():
        assert choose_plan(card * GIB - DEVICE_MARGIN, sizes, RELEASE_IMAGE_RESERVE) == plan, card


def test_plan_too_small_names_the_smallest_plan():
    from lance_model import OutOfMemory
    with pytest.raises(OutOfMemory, match=r"no weight plan fits .* the smallest \(understanding expert streamed; "
                                          r"generation expert streamed"):
        choose_plan(2 * GIB, RELEASE, IMAGE_WORK)


def test_auto_plan_through_load_lance_follows_the_budget(pipe, golden):
    """The tiny model with budgets sized from its own weights: each budget loads the plan choose_plan names and
    results stay within the gate (bit-identical where nothing is quantized)."""
    from lance_model.runtime.vram_plan import working_reserve
    sizes = WeightBytes.of(pipe.llm, pipe.vit.module, pipe.vae.module)
    work = working_reserve(pipe.config, int(pipe.vae.module.config.decoder_base_dim), pipe.dtype)
    reference = pipe.text_to_image("a red cat", **SMALL)
    for plan in candidates():
        budget = sizes.device_bytes(plan) + work
        auto = loaded(golden, memory="auto", vram_budget=budget)
        expected = choose_plan(budget, sizes, work)
        assert auto.plan.stream == expected.stream and auto.plan.stages == expected.stages
        result = auto.text_to_image("a red cat", **SMALL)
        if not auto.plan.fp8:
            assert torch.equal(result.latents, reference.latents)
        else:
            assert psnr(result.frames, reference.frames) >= PSNR_GATE_DB


def test_bad_memory_options_name_the_option(golden):
    from lance_model import InputError
    with pytest.raises(InputError, match="fp8 must be a tuple of experts among"):
        loaded(golden, fp8=("vit",))
    with pytest.raises(InputError, match="fp8 weights need memory"):
        loaded(golden, memory="offload", fp8=("und",))
    with pytest.raises(InputError, match="vram_budget must be an integer"):
        loaded(golden, memory="auto", vram_budget=-1)
    with pytest.raises(InputError, match=r"vram_budget is the budget of memory='auto'.*'resident' does not use it"):
        loaded(golden, vram_budget=8 * GIB)


# ---------------------------------------------------------------- a host takes the placed weights off the device
PLACEMENTS = ["resident", "staged", "und streamed", "both streamed", "stream", "offload"]


def load_placement(golden, which: str, monkeypatch, **options):
    """The tiny model placed as `which` says: each auto candidate (forced: with two layers, streaming one saves the
    tiny model nothing, so no budget would pick it), stream, offload."""
    if which in ("stream", "offload"):
        return loaded(golden, memory=which, **options)
    from lance_model.runtime import loader
    plan = candidates()[PLACEMENTS.index(which)]
    monkeypatch.setattr(loader, "choose_plan", lambda *args: plan)
    placed = loaded(golden, memory="auto", vram_budget=GIB, **options)
    assert placed.plan == plan
    return placed


def expected_on_device(pipe) -> set[str]:
    """Names of the tensors the plan keeps on the device, from its definition: the LLM's but the streamed experts'
    (none in offload mode), the ViT's and VAE's unless they visit as stages."""
    session, plan = pipe.session, pipe.plan
    names = set()
    if session.memory != "offload":
        layers = pipe.llm.language_model.model.layers
        streamed = {id(t) for expert in (plan.stream if plan else ()) for layer in layers
                    for module in layer.expert_modules(expert == "gen") for t in [*module.parameters(),
                                                                                   *module.buffers()]}
        names |= {f"llm.{name}" for name, t in [*pipe.llm.named_parameters(), *pipe.llm.named_buffers()]
                  if id(t) not in streamed}
    if session.memory != "offload" and not (plan and plan.stages):
        names |= {f"{key}.{name}" for key, module in (("vit", session.vit_module), ("vae", session.vae_module))
                  for name, _ in [*module.named_parameters(), *module.named_buffers()]}
    return names


def on_device(pipe, device) -> dict[str, torch.Tensor]:
    session = pipe.session
    return {f"{key}.{name}": t for key, module in (("llm", pipe.llm), ("vit", session.vit_module),
                                                  ("vae", session.vae_module))
            for name, t in [*module.named_parameters(), *module.named_buffers()] if t.device == device}


@pytest.mark.parametrize("which", PLACEMENTS)
def test_rehearsal_offload_and_place_move_exactly_the_plans_weights(golden, second_device, which, monkeypatch):
    """A host unloading a library-placed model (ComfyUI freeing the GPU for another model) and loading it again: the
    weights the plan keeps on the device - and only they, the streamed experts staying in their host slabs - go to
    host memory with the stream slots, and come back; the bytes reported are the bytes there. Torch's lazy device
    (its values kept on the CPU) stands in for the GPU."""
    placed = load_placement(golden, which, monkeypatch)
    session, streamer = placed.session, placed.session.streamer
    session.offload_weights()
    session.device = second_device
    session.place_weights()
    there = on_device(placed, second_device)
    assert set(there) == expected_on_device(placed)
    slots = streamer.slot_bytes if streamer else 0
    assert slots == (streamer.planned_slot_bytes if streamer else 0)
    assert all(slot.device == second_device for stream in (streamer.experts.values() if streamer else ())
               for slot in stream.slots)
    weights = sum(t.numel() * t.element_size() for t in there.values())
    assert session.device_bytes() == session.device_bytes(planned=True) == weights + slots
    assert (weights > 0) == (which != "offload")
    session.offload_weights()
    assert on_device(placed, second_device) == {} and session.device_bytes() == 0
    assert (streamer.slot_bytes if streamer else 0) == 0
    assert session.device_bytes(planned=True) == weights + slots


def test_rehearsal_placement_out_of_memory_leaves_nothing_on_the_device(pipe, golden, second_device, monkeypatch):
    """The device runs out of memory while the weights are being placed (their slots come last): what got there goes
    back to host memory, the call says so as an OutOfMemory, and the next call places them."""
    from lance_model import OutOfMemory
    placed = loaded(golden, memory="stream", defer_placement=True)
    session, streamer = placed.session, placed.session.streamer
    session.device = second_device

    def no_room(device):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(streamer, "allocate_slots", no_room)
    with pytest.raises(OutOfMemory, match="still loaded and usable"):
        placed.text_to_image("a red cat", **SMALL)
    assert on_device(placed, second_device) == {} and not session.weights_placed and session.device_bytes() == 0
    monkeypatch.undo()
    session.place_weights()
    assert set(on_device(placed, second_device)) == expected_on_device(placed)


@pytest.mark.parametrize("which", ["resident", "und streamed", "stream", "offload"])
def test_offloaded_weights_come_back_for_the_next_call_bit_for_bit(golden, which, monkeypatch):
    """After offload_weights the next call that runs the LLM places the weights again by itself (a host need not)
    and gives the same results; a VAE-only call leaves them off the device."""
    placed = load_placement(golden, which, monkeypatch)
    session = placed.session
    before = placed.text_to_image("a red cat", **SMALL)
    answer = placed.understand(None, "What is a cat?", max_new_tokens=4).token_ids
    session.offload_weights()
    assert not session.weights_placed and session.device_bytes() == 0
    placed.decode_latents(before.latents)
    assert not session.weights_placed
    again = placed.text_to_image("a red cat", **SMALL)
    assert session.weights_placed and session.device_bytes() == session.device_bytes(planned=True)
    assert torch.equal(again.latents, before.latents) and torch.equal(again.frames, before.frames)
    session.offload_weights()
    assert placed.understand(None, "What is a cat?", max_new_tokens=4).token_ids == answer


# ---------------------------------------------------------------- no sampled work is lost to a decode
def test_decode_out_of_memory_retries_tiled(pipe, monkeypatch):
    calls = []
    original = type(pipe.vae).decode

    def decode(vae, latents):
        calls.append(vae.tiling_enabled)
        if not vae.tiling_enabled:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(vae, latents)
    monkeypatch.setattr(type(pipe.vae), "decode", decode)
    result = pipe.text_to_image("a red cat", **SMALL)
    assert calls == [False, True] and result.frames is not None and not pipe.vae.tiling_enabled


def test_decode_out_of_memory_keeps_the_sampled_latents(pipe, monkeypatch):
    expected = pipe.text_to_image("a red cat", decode=False, **SMALL).latents

    def decode(vae, latents):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(type(pipe.vae), "decode", decode)
    with pytest.raises(DecodeOutOfMemory, match="the latents are kept") as error:
        pipe.text_to_image("a red cat", **SMALL)
    assert torch.equal(error.value.result.latents, expected) and error.value.result.frames is None
    monkeypatch.undo()
    assert pipe.text_to_image("a red cat", **SMALL).frames is not None


def test_up_front_check_counts_the_decode_it_can_fall_back_to(pipe, monkeypatch):
    """A generation is refused up front only when even its tiled decode cannot fit: the decode itself falls back to
    tiles when the untiled one does not (the untiled estimate would turn away requests that fit)."""
    from lance_model.tasks import generation
    from lance_model.runtime import memory
    side = 2 * memory.TILE_SIDE   # larger than a tile
    inputs = pipe.prepare_text_to_image("a red cat", width=side, height=side)
    options = generation.GenerationSettings(steps=2).sampler_options()
    tiled = generation.estimate(pipe.session, inputs, options, 1, decode_too=True).stages["VAE decode"]
    with pipe.vae.tiled(False):
        untiled = memory.Estimate()
        generation.add_decode(pipe.session, untiled, inputs.target, 1)
    assert sum(tiled.values()) < sum(untiled.stages["VAE decode"].values())
    assert tiled["VAE working set and output"] == memory.vae_decode_bytes(
        int(pipe.vae.module.config.decoder_base_dim), 1, side, side, 1, pipe.vae.dtype, True)
