"""Unit invariants of the model core (spec section 15): positions, embeddings, schedule, routing, masks."""
import math

import pytest
import torch

from lance_model.nn.attention import Attention, bottom_right_causal_mask
from lance_model.nn.llm import MLP, Routing
from lance_model.nn.ops import TorchOps
from lance_model.nn.positions import (GridBlock, MultimodalRotary, Rope, apply_modality_shift, latent_position_embedding,
                                   rope_index, timestep_sinusoid)
from lance_model.tasks.sampler import flow_timesteps
from tests.helpers import assert_close


def test_rope_index_toy_example():
    # ids [A, B, VS, P x 6, VE, C] with grid (1, 4, 6) and merge 2 -> payload on a 2x3 grid starting at 3
    pos = rope_index(11, [GridBlock(3, (1, 4, 6))], merge=2, tokens_per_second=2)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[:, 3:9].T.tolist() == [[3, 3, 3], [3, 3, 4], [3, 3, 5], [3, 4, 3], [3, 4, 4], [3, 4, 5]]
    assert pos[:, 9].tolist() == [6, 6, 6] and pos[:, 10].tolist() == [7, 7, 7]


def test_rope_index_video_temporal_stride():
    pos = rope_index(1 + 31 * 30 * 53, [GridBlock(1, (31, 60, 106))], merge=2, tokens_per_second=2)
    payload = pos[:, 1:]
    assert payload[0].unique().tolist() == list(range(1, 62, 2))
    assert payload[1].max() == 1 + 29 and payload[2].max() == 1 + 52


def test_modality_shift_rule():
    codes = torch.tensor([-1, 4, 4, 4, 2, 2, 2, 0, 1, 1, 1])
    pos = torch.arange(11).expand(3, -1).clone()
    shifted = apply_modality_shift(pos, codes, vit_code=4, source_code=2, target_code=1)
    assert shifted[0, 1:4].tolist() == [1000, 1001, 1002] and shifted[1, 1:4].tolist() == [1, 2, 3]
    assert torch.equal(shifted[:, 8:11], shifted[:, 4:7])


def test_mrope_on_text_equals_1d_rope():
    rotary = MultimodalRotary(head_dim=128, theta=1e6, section=(16, 24, 24))
    pos = torch.arange(10).expand(1, 3, -1)
    cos, sin = rotary(pos)
    inv = 1.0 / 1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    angles = torch.arange(10, dtype=torch.float64)[:, None] * inv
    assert torch.allclose(cos[0], torch.cat([angles, angles], -1).cos().float(), atol=1e-6)
    x = torch.randn(1, 10, 2, 128)
    assert torch.allclose(Rope.of(cos, sin).rotate(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4)


def test_rope_rotate_is_the_rotate_half_convention():
    """x cos + rotate_half(x) sin with rotate_half(x) = [-x2, x1], as the reference writes it."""
    cos, sin = MultimodalRotary(head_dim=8, theta=1e4, section=(2, 1, 1))(torch.arange(5).expand(1, 3, -1))
    x = torch.randn(1, 5, 3, 8)
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    expected = x * cos.unsqueeze(2) + rotate_half * sin.unsqueeze(2)
    assert torch.allclose(Rope.of(cos, sin).rotate(x), expected, atol=1e-6)


def test_latent_position_table_values():
    table = latent_position_embedding(2, 3, 4, hidden=2048, max_latent_size=64)
    row0 = table[0]
    assert row0[:341].abs().max() == 0 and (row0[341:682] == 1).all() and (row0[1364:1706] == 0).all()
    row = table[1 * 12 + 2 * 4 + 3]  # t=1, y=2, x=3
    assert math.isclose(row[0], math.sin(1), abs_tol=1e-6)
    assert math.isclose(row[1], math.sin(10000 ** (-1 / 341)), abs_tol=1e-6)
    assert math.isclose(row[682], math.sin(2), abs_tol=1e-6) and math.isclose(row[341], math.cos(1), abs_tol=1e-6)


def test_latent_position_aliasing_matches_table_lookup():
    wide = latent_position_embedding(1, 1, 72, hidden=64, max_latent_size=64)
    regular = latent_position_embedding(1, 2, 64, hidden=64, max_latent_size=64)
    assert torch.equal(wide[64:72], regular[64:72])  # x >= 64 reads the next row's entries, as the reference


def test_timestep_embedding_at_zero():
    emb = timestep_sinusoid(torch.zeros(1), 256)
    assert (emb[0, :128] == 1).all() and (emb[0, 128:] == 0).all()


def test_schedule_matches_spec():
    t = flow_timesteps(30, 3.5)
    for i, value in ((1, 0.990244), (25, 0.411765), (26, 0.35), (29, 0.107692)):
        assert math.isclose(float(t[i]), value, abs_tol=1e-5)
    assert sum(1 for x in t[:-1] if 0.4 < x <= 1.0) == 26


def test_routing_runs_the_majority_expert_and_overwrites_the_others_rows():
    routing = Routing.of(torch.tensor([False, True, True, True, False]), torch.device("cpu"))
    assert routing.major_gen and routing.minor_rows.tolist() == [0, 4]
    assert Routing.of(torch.zeros(5, dtype=torch.bool), torch.device("cpu")) == Routing(False, None)
    major, minor = torch.zeros(1, 5, 2), torch.ones(1, 2, 2)
    routing.overwrite((major,), (minor,))
    assert major[0, :, 0].tolist() == [1, 0, 0, 0, 1]


def test_bottom_right_causal_mask_and_prefix_attention():
    mask = bottom_right_causal_mask(2, 5, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask)
    assert torch.allclose(Attention("sdpa")(q, k, v, causal_bottom_right=True), full, atol=1e-6)


def test_chunked_mlp_equals_unchunked(monkeypatch):
    from lance_model.nn.config import LLMConfig

    cfg = LLMConfig(64, 128, 1, 4, 2, 16, 100, 1e-6, 1e6, (2, 3, 3), 2, 2, None, None)
    mlp = MLP(cfg, TorchOps)
    x = torch.randn(2, 50, 64)
    whole = mlp(x)
    monkeypatch.setattr(MLP, "CHUNK_TOKENS", 16)
    assert torch.allclose(mlp(x), whole, atol=1e-6)


@pytest.mark.parametrize("frames, cached", [(1, 0), (1, 1), (1, 2), (2, 0), (3, 0), (4, 1)])
@pytest.mark.parametrize("kernel, padding", [((3, 3, 3), (1, 1, 1)), ((3, 1, 1), (1, 0, 0)), ((1, 3, 3), (0, 1, 1))])
def test_zero_skipping_causal_conv_matches_diffusers(frames, cached, kernel, padding):
    """The VAE's faster causal conv (lance_model/nn/vae_convs.py) equals diffusers' layer for every cache state."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from lance_model.nn.vae_convs import ZeroSkippingCausalConv3d, skip_zero_frames
    torch.manual_seed(0)
    plain = WanCausalConv3d(6, 5, kernel, padding=padding)
    fast = WanCausalConv3d(6, 5, kernel, padding=padding)
    fast.load_state_dict(plain.state_dict())
    assert skip_zero_frames(torch.nn.Sequential(fast)) == 1 and isinstance(fast, ZeroSkippingCausalConv3d)
    x = torch.randn(2, 6, frames, 7, 9)
    cache = torch.randn(2, 6, cached, 7, 9) if cached else None
    expected = plain(x, cache)
    assert_close(fast(x, cache), expected, 1e-5, f"causal conv, {frames} frames, {cached} cached")
