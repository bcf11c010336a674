"""Streamed weights: the weights of some modules of every decoder layer (an expert, or both) live in host memory
(pinned on CUDA) and visit the device one layer at a time, through a fixed set of device slots.

Every decoder layer has the same shapes, so `ahead + 1` slots serve them all. While layer i runs from its slot,
the weights of layers i+1 .. i+ahead are copied into the other slots on a side CUDA stream (an event per slot
orders each copy after the compute that last read the slot, and the compute after its copy); no memory is
allocated per layer. On the CPU the same machinery copies synchronously, which is what the tests run: streamed
results equal resident ones bit for bit.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .device_backend import HostBackend, backend_for


class LayerStreamer:
    def __init__(self, layers: nn.ModuleList, groups: list[list[nn.Module]], device: torch.device, ahead: int = 2,
                 backend: HostBackend | None = None):
        """`groups[i]`: the modules of decoder layer i whose parameters stream (the same structure every layer)."""
        self.layers = layers
        self.backend = backend or backend_for(device)
        self.device = self.backend.device
        self.params = [[p for module in group for p in module.parameters()] for group in groups]
        shapes = [(p.shape, p.dtype) for p in self.params[0]]
        if any([(p.shape, p.dtype) for p in params] != shapes for params in self.params):
            raise ValueError("streamed layers must all have the same parameter shapes and dtypes")
        self.host = [[self.backend.pin(p.detach().to("cpu")) for p in params] for params in self.params]
        self.slots = [[torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in shapes]
                      for _ in range(min(ahead + 1, len(self.params)))]
        self.copy_stream = self.backend.side_stream()
        self.loaded = [None] * len(self.slots)          # which layer each slot holds
        self.copied = [None] * len(self.slots)          # events: the slot's copy finished
        self.released = [None] * len(self.slots)        # events: the last compute reading the slot finished
        self._unbind()

    @property
    def slot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.slots for t in slot)

    def _unbind(self) -> None:
        """Between runs the parameters point at their host copies (no device memory held)."""
        for params, host in zip(self.params, self.host):
            for param, tensor in zip(params, host):
                param.data = tensor

    @contextlib.contextmanager
    def active(self):
        """While active, each decoder layer finds its streamed weights on the device when it runs."""
        handles = [layer.register_forward_pre_hook(self._before(i)) for i, layer in enumerate(self.layers)]
        handles += [layer.register_forward_hook(self._after(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            # nothing may still read or fill a slot when the run ends (the next run starts from empty slots)
            self.backend.synchronize(self.copy_stream)
            self.backend.synchronize()
            self.loaded = [None] * len(self.slots)
            self.copied = [None] * len(self.slots)
            self.released = [None] * len(self.slots)
            self._unbind()

    def _slot_of(self, layer: int) -> int:
        return layer % len(self.slots)

    def _before(self, layer: int):
        def hook(module, args):
            slot = self._slot_of(layer)
            if self.loaded[slot] != layer:
                self._copy(layer)
            self.backend.wait_event(self.copied[slot])
            for param, tensor in zip(self.params[layer], self.slots[slot]):
                param.data = tensor
            for ahead in range(1, len(self.slots)):   # prefetch the next layers into the other slots
                following = (layer + ahead) % len(self.layers)
                # past the last layer the next pass's first layers come; when the layer count is not a multiple
                # of the slot count one of them maps to the slot this layer is about to read: it waits
                if self._slot_of(following) != slot and self.loaded[self._slot_of(following)] != following:
                    self._copy(following)
        return hook

    def _after(self, layer: int):
        def hook(module, args, output):
            slot = self._slot_of(layer)
            self.released[slot] = self.backend.record()
            for param, tensor in zip(self.params[layer], self.host[layer]):
                param.data = tensor
        return hook

    def _copy(self, layer: int) -> None:
        """Fill the layer's slot on the copy stream, after the compute that last read the slot."""
        slot = self._slot_of(layer)
        with self.backend.on(self.copy_stream):
            self.backend.wait_event(self.released[slot], self.copy_stream)
            for target, source in zip(self.slots[slot], self.host[layer]):
                target.copy_(source, non_blocking=self.backend.asynchronous)
            self.copied[slot] = self.backend.record(self.copy_stream)
        self.loaded[slot] = layer


def stream_experts(llm: nn.Module, experts: tuple[str, ...], device: torch.device, ahead: int = 2,
                   backend: HostBackend | None = None) -> LayerStreamer:
    """A streamer for the named experts of every decoder layer of `llm` (their weights move to host memory)."""
    layers = llm.language_model.model.layers
    groups = [[m for expert in experts for m in layer.expert_modules(expert == "gen")] for layer in layers]
    return LayerStreamer(layers, groups, device, ahead, backend)
