"""Stored media encodings: a repeated edit encodes its source once, with results identical to encoding again."""
import torch

from lance_model.runtime.encode_store import EncodeStore

SMALL = dict(steps=2, decode=False)


def counting(result):
    calls = []
    return calls, lambda: calls.append(1) or result


def test_same_pixels_and_context_computed_once():
    store = EncodeStore()
    pixels = torch.rand(3, 1, 8, 8)
    calls, compute = counting((torch.ones(2), torch.zeros(3)))
    first = store.get_or_compute("vae", pixels, ("fp32",), compute)
    again = store.get_or_compute("vae", pixels.clone(), ("fp32",), compute)
    assert len(calls) == 1 and store.hits == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    again[0].add_(5)   # the caller owns what it gets: the stored copy is unchanged
    assert torch.equal(store.get_or_compute("vae", pixels, ("fp32",), compute)[0], torch.ones(2))


def test_other_pixels_stage_or_context_are_misses():
    store = EncodeStore()
    pixels = torch.rand(3, 1, 8, 8)
    calls, compute = counting((torch.ones(2),))
    store.get_or_compute("vae", pixels, ("fp32",), compute)
    store.get_or_compute("vae", pixels + 1e-3, ("fp32",), compute)
    store.get_or_compute("vit", pixels, ("fp32",), compute)
    store.get_or_compute("vae", pixels, ("bf16",), compute)
    store.get_or_compute("vae", pixels.double(), ("fp32",), compute)
    assert len(calls) == 5 and store.hits == 0


def test_bounded_by_entries_and_bytes():
    store = EncodeStore(max_entries=2, max_bytes=64)
    calls, compute = counting((torch.ones(4),))   # 16 bytes
    for value in range(3):
        store.get_or_compute("vae", torch.full((2,), float(value)), (), compute)
    assert len(store) == 2
    store.get_or_compute("vae", torch.full((2,), 0.0), (), compute)   # the oldest was evicted
    assert len(calls) == 4
    big_calls, big = counting((torch.ones(100),))   # 400 bytes: computed, never stored
    store.get_or_compute("vae", torch.zeros(1), (), big)
    store.get_or_compute("vae", torch.zeros(1), (), big)
    assert len(big_calls) == 2
    store.clear()
    assert len(store) == 0


def test_repeated_edit_encodes_once_and_matches_a_fresh_encode(pipe, monkeypatch):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    pipe.encodings.clear()
    encodes, embeds = [], []
    vae_encode, vit_embed = pipe.vae.encode, pipe.vit.embed
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: encodes.append(1) or vae_encode(*a, **k))
    monkeypatch.setattr(pipe.vit, "embed", lambda *a, **k: embeds.append(1) or vit_embed(*a, **k))
    first = pipe.edit_image(image, "make it blue", resolution="image_256res", seed=1, **SMALL).latents
    second = pipe.edit_image(image, "make it blue", resolution="image_256res", seed=2, **SMALL).latents
    assert (len(encodes), len(embeds)) == (1, 1)
    pipe.encodings.clear()
    pipe.prefixes.clear()
    fresh = pipe.edit_image(image, "make it blue", resolution="image_256res", seed=2, **SMALL).latents
    assert (len(encodes), len(embeds)) == (2, 2)
    assert torch.equal(second, fresh) and not torch.equal(first, second)


def test_reference_sampling_still_draws_per_seed(pipe):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    run = lambda seed: pipe.prepare_edit(image, "make it blue", video=False, resolution="image_256res",
                                         settings=_settings(seed)).source_latents[0]
    a, b, a_again = run(1), run(2), run(1)
    assert pipe.encodings.hits >= 2
    assert not torch.equal(a, b) and torch.equal(a, a_again)


def _settings(seed):
    from lance_model.pipeline import GenerationSettings
    return GenerationSettings(seed=seed, condition_sampling="reference")
