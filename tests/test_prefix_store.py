"""Prefix reuse across runs (lance_model/runtime/prefix_store.py): the same request again skips its prefill and gives
bit-identical results; another request, other weights or a new weights version miss; failures clear it."""
import pytest
import torch

from lance_model.pipeline import GenerationSettings

INSTRUCTION = "make the sky red"


@pytest.fixture
def fresh_store(pipe):
    pipe.prefixes.clear()
    pipe.prefixes.hits = 0
    yield pipe.prefixes
    pipe.prefixes.clear()
    pipe.session.weights_version = lambda: None


def edit(pipe, image, instruction=INSTRUCTION, seed=7, **options):
    settings = GenerationSettings(steps=2, decode=False, seed=seed, **options)
    inputs = pipe.prepare_edit(image, instruction, video=False, resolution="image_256res", settings=settings)
    return pipe.generate("image_edit", instruction, inputs, settings).latents


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


def without_store(pipe, fn):
    saved, pipe.prefixes.max_bytes = pipe.prefixes.max_bytes, 0
    try:
        pipe.prefixes.clear()
        return fn()
    finally:
        pipe.prefixes.max_bytes = saved


def test_the_same_request_reuses_its_prefixes(pipe, image, fresh_store):
    reference = without_store(pipe, lambda: edit(pipe, image, seed=8))
    assert fresh_store.hits == 0 and fresh_store.nbytes == 0
    edit(pipe, image)
    assert fresh_store.hits == 0 and fresh_store.nbytes > 0
    again = edit(pipe, image, seed=8)          # another seed: the same prefixes
    assert fresh_store.hits == 2               # cond and uncond
    assert torch.equal(again, reference)


def test_image_cfg_branch_is_stored_too(pipe, image, fresh_store):
    edit(pipe, image, image_cfg_scale=1.5)
    reference = without_store(pipe, lambda: edit(pipe, image, image_cfg_scale=1.5))
    fresh_store.hits = 0
    edit(pipe, image, image_cfg_scale=1.5)
    again = edit(pipe, image, image_cfg_scale=1.5)
    assert fresh_store.hits == 3 and torch.equal(again, reference)


def test_another_request_or_weights_version_misses(pipe, image, fresh_store):
    edit(pipe, image)
    edit(pipe, image, instruction="turn it into winter")
    assert fresh_store.hits == 0
    other = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    edit(pipe, other, instruction="turn it into winter")
    assert fresh_store.hits == 0
    pipe.session.weights_version = lambda: "patched"
    edit(pipe, other, instruction="turn it into winter")
    assert fresh_store.hits == 0


def test_weights_changed_in_place_with_a_new_version_are_seen(pipe, image, fresh_store):
    edit(pipe, image)
    weight = pipe.llm.language_model.model.layers[0].self_attn.k_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        pipe.session.weights_version = lambda: "scaled"
        stored = edit(pipe, image)
        fresh = without_store(pipe, lambda: edit(pipe, image))
        assert fresh_store.hits == 0 and torch.equal(stored, fresh)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_the_store_is_bounded(pipe, image, fresh_store):
    fresh_store.max_bytes = 1
    try:
        edit(pipe, image)
        edit(pipe, image)
        assert fresh_store.nbytes == 0 and fresh_store.hits == 0
    finally:
        fresh_store.max_bytes = type(fresh_store)().max_bytes


def test_a_cancelled_run_clears_the_store(pipe, image, fresh_store):
    from lance_model import Cancelled
    edit(pipe, image)
    assert fresh_store.nbytes > 0
    with pytest.raises(Cancelled):
        edit(pipe, image, cancel=lambda: True)
    assert fresh_store.nbytes == 0
