"""Generation tasks against the official implementation's fixtures (t2i, t2v, i2v, image_edit, video_edit):
packed inputs, noise, step-0 velocities, final latents and decoded pixels, through the public pipeline."""
import pytest
import torch

from lance_model.tasks.packing import CODE_CAPTION
from tests.helpers import GEN_TASKS, assert_close, prepare, settings_for


def reference_packed_fields(inputs) -> dict:
    """Our packed sequence expressed in the reference's `packed/*` field names."""
    seq = inputs.seq
    latent_blocks = [b for b in seq.blocks if b.role != "vit"]
    vit_blocks = seq.blocks_with_role("vit")
    payload = lambda blocks: torch.cat([torch.arange(b.payload.start, b.payload.stop) for b in blocks]) if blocks else torch.zeros(0, dtype=torch.long)
    visual = torch.zeros(len(seq), dtype=torch.bool)
    visual[payload(seq.blocks)] = True
    target = seq.target
    frozen = 0 if inputs.first_frame is None else inputs.first_frame.shape[0]
    fields = {
        "packed/packed_text_ids": seq.ids,
        "packed/sample_modality": seq.codes,
        "packed/packed_text_indexes": torch.nonzero(~visual).squeeze(1),
        "packed/packed_vae_token_indexes": payload(latent_blocks),
        "packed/mse_loss_indexes": torch.arange(target.payload.start + frozen, target.payload.stop),
        "packed/vae_video_grid_thw": torch.tensor([b.rope_grid for b in latent_blocks]),
        "packed/video_grid_thw": torch.tensor([[b.rope_grid for b in seq.blocks]]),
        "packed/packed_position_ids": legacy_positions(seq),
    }
    if vit_blocks:
        fields["packed/packed_vit_token_indexes"] = payload(vit_blocks)
        fields["packed/vit_video_grid_thw"] = torch.tensor([b.rope_grid for b in vit_blocks])
    return fields


def legacy_positions(seq) -> torch.Tensor:
    """The reference's 1-D packed positions: +1 per causal token, one shared position per visual split."""
    out, nxt = [], 0
    for split in seq.splits:
        if split.mode == "causal":
            out += list(range(nxt, nxt + split.length))
            nxt += split.length
        else:
            out += [nxt] * split.length
            nxt += 1
    return torch.tensor(out)


@pytest.fixture(scope="module")
def runs(pipe, golden):
    """Each fixture task run once through the pipeline; step-0 velocities captured by an observer."""
    results = {}
    for name in golden.tasks(*GEN_TASKS):
        settings = settings_for(golden, name)
        inputs = prepare(pipe, golden, name, settings)
        captured = {}

        def observer(info, captured=captured):
            if info.step == 0:
                captured.update(v_cond=info.v_cond[0], v_uncond=info.v_uncond[0], v_cfg=info.v[0])
        result = pipe.generate(name, golden.hyper(name)["caption"], inputs, settings, observer=observer)
        results[name] = (inputs, result, captured)
    return results


@pytest.mark.parametrize("name", GEN_TASKS)
def test_parity_packed_inputs(golden, pipe, runs, name):
    if name not in runs:
        pytest.fail(f"fixture {name} missing from the golden set")
    inputs, _, _ = runs[name]
    fx = golden.tensors(name)
    extra = golden.fixture(name)["non_tensor_packed_fields"]
    assert [s.length for s in inputs.seq.splits] == extra["split_lens"]
    assert [s.mode for s in inputs.seq.splits] == extra["attn_modes"]
    for key, ours in reference_packed_fields(inputs).items():
        assert key in fx, f"{key} not in fixture"
        assert torch.equal(ours.to(torch.long), fx[key].to(torch.long)), f"{name}: {key} differs"


@pytest.mark.parametrize("name", GEN_TASKS)
def test_parity_noise(golden, pipe, runs, name):
    inputs, _, _ = runs[name]
    fx = golden.tensors(name)
    from lance_model.tasks.generation import initial_noise

    noise = initial_noise(inputs, [golden.hyper(name)["validation_noise_seed"]], pipe.config.constants.latent_channels)[0]
    offset = fx["noise/x_T"].shape[0] - inputs.target.tokens
    assert torch.equal(noise, fx["noise/x_T"][offset:]), f"{name}: noise differs from the reference stream"
    frozen = 0 if inputs.first_frame is None else inputs.first_frame.shape[0]
    init = fx["denoise/x_init_tokens"][offset:]
    assert torch.equal(noise[frozen:], init[frozen:])


@pytest.mark.parametrize("name", GEN_TASKS)
def test_parity_velocities_step0(golden, runs, name):
    _, _, captured = runs[name]
    fx = golden.tensors(name)
    for ours, key in (("v_cond", "denoise/v_cond_step0"), ("v_uncond", "denoise/v_uncond_step0"), ("v_cfg", "denoise/v_cfg_step0")):
        expected = fx[key]
        actual = captured[ours][-expected.shape[0]:]
        assert_close(actual, expected, golden.tolerance(key), f"{name} {key}")


@pytest.mark.parametrize("name", GEN_TASKS)
def test_parity_final_latents_and_pixels(golden, runs, name):
    inputs, result, _ = runs[name]
    fx = golden.tensors(name)
    latent_key = "out/latent.1" if "out/latent.1" in fx else "out/latent.0"
    expected = fx[latent_key]  # [t, h, w, C]
    ours = result.latents[0].permute(1, 2, 3, 0)
    assert_close(ours, expected, golden.tolerance(latent_key), f"{name} {latent_key}")
    decoded = fx["out/decoded.0"]  # [3, T, H, W] in [-1, 1]
    tol = golden.tolerance("out/decoded.0") * (2 if decoded.dtype == torch.float16 else 1)
    assert_close(result.frames[0].permute(3, 0, 1, 2) * 2 - 1, decoded.float(), tol, f"{name} out/decoded.0")
    if "out/decoded_uint8_thwc" in fx:
        ours_u8 = torch.floor(result.frames[0] * 255 + 0.5).clamp(0, 255)
        assert_close(ours_u8, fx["out/decoded_uint8_thwc"].float(), golden.tolerance("out/decoded_uint8_thwc"), f"{name} uint8")


def test_parity_timesteps(golden):
    from lance_model.tasks.sampler import flow_timesteps

    for name in golden.tasks(*GEN_TASKS):
        hp = golden.hyper(name)
        assert_close(flow_timesteps(hp["steps"], hp["timestep_shift"]), golden.tensors(name)["denoise/timesteps"], 1e-7, f"{name} timesteps")


def test_batched_cfg_equals_sequential(pipe, golden):
    name = golden.tasks("image_edit", "t2i")[0]
    results = []
    for batched in (True, False):
        settings = settings_for(golden, name, batched_cfg=batched, decode=False)
        results.append(pipe.generate(name, "x", prepare(pipe, golden, name, settings), settings).latents)
    assert_close(results[0], results[1], 1e-5, "batched vs sequential CFG")


def test_batch_of_seeds_matches_single_runs(pipe, golden):
    hp = golden.hyper("t2i")
    kwargs = dict(width=hp["video_width"], height=hp["video_height"], steps=2, decode=False)
    both = pipe.text_to_image(hp["caption"], seed=7, batch_size=2, **kwargs).latents
    for i, seed in enumerate((7, 8)):
        single = pipe.text_to_image(hp["caption"], seed=seed, **kwargs).latents
        assert_close(both[i], single[0], 1e-5, f"batch row {i} vs seed {seed}")


def test_uncond_branch_drops_exactly_the_caption(pipe, golden, runs):
    for name, (inputs, _, _) in runs.items():
        caption_ids = pipe.tokenizer.encode(golden.hyper(name)["caption"])
        dropped = inputs.seq.ids[inputs.seq.codes == CODE_CAPTION].tolist()
        assert dropped == caption_ids, f"{name}: the CFG-droppable tokens are not the caption"


def test_auto_cfg_batching_matches_both_modes(pipe, golden, monkeypatch):
    """Auto mode picks batched or sequential by size; both give the same latents."""
    from lance_model.tasks import branches

    settings = settings_for(golden, "t2i", decode=False)
    inputs = prepare(pipe, golden, "t2i", settings)
    auto = pipe.generate("t2i", "x", inputs, settings).latents
    monkeypatch.setattr(branches, "BATCHED_CFG_MAX_TOKENS", 1)
    forced_sequential = pipe.generate("t2i", "x", inputs, settings).latents
    assert_close(auto, forced_sequential, 1e-5, "auto (batched) vs auto over the limit (sequential)")


def test_chunked_prefill_matches_the_fixtures(pipe, golden, monkeypatch):
    """Long prompts are prefilled in chunks (each sees the cache and itself causally): the same attention, so
    with tiny chunks every generation fixture still matches the official latents."""
    from lance_model.nn import llm
    monkeypatch.setattr(llm, "PREFILL_CHUNK_TOKENS", 7)
    pipe.prefixes.clear()
    for name in golden.tasks(*GEN_TASKS):
        settings = settings_for(golden, name, decode=False)
        latents = pipe.generate(name, "x", prepare(pipe, golden, name, settings), settings).latents
        fx = golden.tensors(name)
        key = "out/latent.1" if "out/latent.1" in fx else "out/latent.0"
        assert_close(latents[0].permute(1, 2, 3, 0), fx[key], golden.tolerance(key), f"{name} chunked prefill")
    pipe.prefixes.clear()
