"""Core's view of a Lance whose weights the library places itself (Lance Loader memory_mode offload, auto, stream).

ComfyUI decides which models stay on the GPU from each loaded model's patcher: its size, how much of it is
loaded, and unloading it when another model needs the room. The library's VRAM plan keeps experts in host slabs or
in fp8 and streams them layer by layer, which core's per-layer loading does not know, so core must never move these
weights itself - but it must see them. This patcher reports the bytes the plan keeps on the device (the LLM's
resident weights, the stream slots, the ViT and VAE unless they visit as stages; nothing in offload mode), puts
them there when core loads it, and takes them all off when core unloads it: a plan is placed whole or not at all
(a partial unload frees nothing, so core unloads the model). The next Lance call loads it again.

It is not a core MODEL: the native nodes refuse it (native_nodes.native_patcher) and nothing samples through it.
"""
from __future__ import annotations

import torch

import comfy.model_patcher


class LancePlacedWeights(torch.nn.Module):
    """What core's list of loaded models holds for a library-placed Lance (core logs its class name). The session
    is not a submodule: core's generic walks (module_size, state_dict) must not reach the library's weights."""

    def __init__(self, session):
        super().__init__()
        self.__dict__["session"] = session


class PlacedPatcher(comfy.model_patcher.ModelPatcher):
    """Constructed as core constructs its patchers (a clone shares the model, hence the session); its `size` (core's
    model_size) is the bytes the plan puts on the device, fixed with the plan."""

    @property
    def session(self):
        return self.model.session

    def loaded_size(self) -> int:
        return self.session.device_bytes()

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.session.weights_placed else self.offload_device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
        """Core loads the model (it made room for model_size first): the plan is placed whole."""
        before = self.loaded_size()
        self.session.place_weights()
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False) -> int:
        return 0   # nothing freed: core then unloads the model (detach)

    def detach(self, unpatch_all=True):
        """Core unloads the model with unpatch_all; without it (a clone replaced by another clone, a patcher being
        freed) the weights stay where they are, as with core's own patchers."""
        if unpatch_all:
            self.session.offload_weights()
        return self.model


def placed_patcher(session, load_device: torch.device, offload_device: torch.device) -> PlacedPatcher:
    return PlacedPatcher(LancePlacedWeights(session), load_device=load_device, offload_device=offload_device,
                         size=session.device_bytes(planned=True))


def is_placed_patcher(patcher) -> bool:
    return isinstance(patcher, PlacedPatcher)
