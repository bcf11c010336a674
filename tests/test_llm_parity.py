"""The MoT LLM block forward against the reference's forward_train on a packed sequence with a dense mask."""
import torch

from lance_model.nn.attention import bottom_right_causal_mask
from lance_model.nn.llm import Routing
from tests.helpers import assert_close


def test_parity_llm_forward(pipe, golden):
    """Run the fixture's splits through the production path (split-by-split prefill into a KV cache, then the
    noise split as a non-committed query) and compare every row with the reference's last hidden state."""
    fx = golden.tensors("llm_forward")
    hp = golden.hyper("llm_forward")
    x, pos = fx["llm_forward/packed_sequence"][None], fx["llm_forward/position_ids"][None]
    gen = torch.zeros(x.shape[1], dtype=torch.bool)
    gen[fx["llm_forward/gen_token_indexes"]] = True
    llm = pipe.llm
    cache = llm.new_cache(1, x.shape[1])
    outputs, start = [], 0
    with torch.inference_mode():
        for length, mode in zip(hp["split_lens"], hp["attn_modes"]):
            part = slice(start, start + length)
            outputs.append(llm(x[:, part], pos[:, :, part], Routing.of(gen[part], llm.device), cache=cache, start=start,
                               causal=mode == "causal"))
            start += length
    assert_close(torch.cat(outputs, 1)[0], fx["llm_forward/last_hidden_state"],
                 golden.tolerance("llm_forward/last_hidden_state"), "llm_forward last_hidden_state")


def test_fixture_mask_has_the_block_semantics_we_implement(golden):
    """The dense mask of the fixture = causal text, bidirectional blocks, nothing reads the noise block."""
    hp = golden.hyper("llm_forward")
    allowed = golden.tensors("llm_forward")["llm_forward/attention_mask_dense"] == 0
    n = allowed.shape[0]
    ours = bottom_right_causal_mask(n, n, torch.device("cpu"))
    start = 0
    for length, mode in zip(hp["split_lens"], hp["attn_modes"]):
        block = slice(start, start + length)
        if mode != "causal":
            ours[block, block] = True
        if mode == "noise":
            ours[start + length:, block] = False
            ours[:start, block] = False
        start += length
    assert torch.equal(ours, allowed)
