"""The LLM keeps no device tensors per prompt layout: whatever a host's memory accounting cannot see must not grow
with the prompts it has run (#25: an index cache keyed on every block layout was never freed)."""
from __future__ import annotations

import torch
from torch import nn


def held_tensors(llm: nn.Module) -> int:
    """Tensors reachable from the LLM's own attributes (its helpers and containers), besides its parameters and
    buffers and those of its submodules."""
    own = ("_parameters", "_buffers", "_modules")
    seen, stack, count = set(), [value for name, value in vars(llm).items() if name not in own], 0
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, nn.Module):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            count += 1
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            stack.extend(vars(value).values())
    return count


def test_llm_holds_no_tensors_per_prompt_layout(pipe):
    pipe.text_to_image("a cat", width=64, height=64, steps=1, seed=1, decode=False)
    held = held_tensors(pipe.llm)
    for prompt in ("a red cat on a mat", "dog", "a long prompt about a red cat sitting on a big green mat"):
        pipe.text_to_image(prompt, width=64, height=64, steps=1, seed=1, decode=False, batch_size=2)
        pipe.text_to_image(prompt, width=96, height=64, steps=1, seed=1, decode=False, batched_cfg=False)
    assert held_tensors(pipe.llm) == held
