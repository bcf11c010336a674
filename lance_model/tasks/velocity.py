"""One denoising step's velocity for a host's own sampler (ComfyUI's samplers through lance_nodes/native_model.py).

The host asks for the velocities of several chunks of rows at once, each chunk tied to one CFG `Branch` of a
request (positive / negative / image-negative conditioning). The branch engine (branches.py) prefills every
branch once per run, in the library sampler's cache layout and order, so the velocities equal the library
sampler's. The host calls `engine.reset()` once per sampling run.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .branches import Branch, BranchEngine, with_first_frame


def host_velocity(engine: BranchEngine, x: torch.Tensor, t: torch.Tensor, branches: list[Branch],
                  batched: bool | None = None) -> torch.Tensor:
    """x [R, N, C] target latents (normalized) as len(branches) equal chunks of rows, t [R] one timestep per row.
    Returns the velocities [R, N, C] (fp32) in x's row order."""
    if x.shape[0] % len(branches):
        raise InputError(f"{x.shape[0]} latent rows cannot be split into {len(branches)} branch chunks")
    for branch in branches:
        if branch.inputs.target.tokens != x.shape[1]:
            raise InputError(f"the latent has {x.shape[1]} tokens but the conditioning's target block expects "
                             f"{branch.inputs.target.tokens}: use the LATENT made with this conditioning")
    rows = x.shape[0] // len(branches)
    chunks = [(branch, with_first_frame(branch.inputs, x[i * rows:(i + 1) * rows]), t[i * rows:(i + 1) * rows])
              for i, branch in enumerate(branches)]
    with torch.no_grad():
        velocities = engine.velocities(chunks, batched)
    return torch.cat(velocities) if len(velocities) > 1 else velocities[0]
