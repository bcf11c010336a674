"""Streamed weights: the weights of one or both experts of every decoder layer live in host memory and visit the
device one layer at a time, through a fixed set of device slots.

Host side: one flat buffer (a slab) per expert per layer. Its parameters are packed into it one group at a time and
rebound as views of it as soon as they are copied, so host memory never holds the streamed weights twice; on CUDA
each slab is page-locked where it is (cudaHostRegister: exactly its size, where PyTorch's pinned allocator would
round every block up to a power of two) and unlocked when the slab is freed.

Device side: every layer's group has the same layout, so per streamed expert `ahead + 1` slots (flat buffers of
that layout) serve all layers. A layer's pre-hook looks at the block's routing and brings only the experts it runs
(an understanding answer never copies the generation expert), one copy per expert; while layer i runs, layers
i+1 .. i+ahead are copied into the other slots on a side CUDA stream (an event per slot orders each copy after the
compute that last read the slot, and the compute after its copy); nothing is allocated per layer. The slots exist
while the weights are placed (allocate_slots / free_slots: a host that offloads the model gets their memory back).
On the CPU the same machinery copies synchronously (device_backend.py), which is what the tests run: streamed
results equal resident ones bit for bit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.llm import Routing
from .device_backend import HostBackend, backend_for

ALIGN = 256   # bytes: every tensor of a slab starts at a multiple of this (any dtype's alignment; DMA-friendly)


@dataclass(frozen=True)
class SlabLayout:
    """Where each parameter of a group lives in one flat byte buffer (the same for every layer)."""

    entries: tuple[tuple[int, torch.Size, torch.dtype], ...]   # (byte offset, shape, dtype)
    nbytes: int

    @classmethod
    def of(cls, params: list[torch.Tensor]) -> "SlabLayout":
        entries, offset = [], 0
        for param in params:
            entries.append((offset, param.shape, param.dtype))
            offset += -(-param.numel() * param.element_size() // ALIGN) * ALIGN
        return cls(tuple(entries), offset)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """The parameters' tensors inside `buffer` (uint8 [nbytes])."""
        views = []
        for offset, shape, dtype in self.entries:
            views.append(buffer[offset:offset + shape.numel() * dtype.itemsize].view(dtype).view(shape))
        return views


def pack(params: list[nn.Parameter], layout: SlabLayout) -> torch.Tensor:
    """A host slab holding `params`, each rebound to its view as soon as it is copied (its old storage is freed
    then, unless something else holds it)."""
    slab = torch.empty(layout.nbytes, dtype=torch.uint8)
    for param, view in zip(params, layout.views(slab)):
        view.copy_(param.data)
        param.data = view
    return slab


class ExpertStream:
    """One streamed expert: its slab per layer (host), its device slots, and the events ordering their use."""

    def __init__(self, name: str, groups: list[list[nn.Module]], backend: HostBackend, slot_count: int):
        self.name, self.backend = name, backend
        self.params = [[p for module in group for p in module.parameters()] for group in groups]
        self.layout = SlabLayout.of(self.params[0])
        if any(SlabLayout.of(params) != self.layout for params in self.params):
            raise ValueError("streamed layers must all have the same parameter shapes and dtypes")
        self.slabs = [pack(params, self.layout) for params in self.params]
        # page-locked in place (CUDA); each handle unlocks its slab when the slab is freed
        self.pinned = [backend.register(slab) for slab in self.slabs]
        self.host = [self.layout.views(slab) for slab in self.slabs]
        self.slot_count = slot_count
        self.slots, self.slot_views = [], []   # allocated when the weights are placed (allocate_slots)
        self.reset()
        self.copied_bytes = 0

    def allocate_slots(self, device: torch.device) -> None:
        """The device slots (again, after free_slots)."""
        if not self.slots:
            self.slots = [torch.empty(self.layout.nbytes, dtype=torch.uint8, device=device)
                          for _ in range(self.slot_count)]
            self.slot_views = [self.layout.views(slot) for slot in self.slots]
        self.reset()

    def free_slots(self) -> None:
        """Give the device slots back (between runs: the parameters point at the host slabs then)."""
        self.slots, self.slot_views = [], []
        self.reset()

    def reset(self) -> None:
        self.loaded = [None] * self.slot_count     # which layer each slot holds
        self.copied = [None] * self.slot_count     # events: the slot's copy finished
        self.released = [None] * self.slot_count   # events: the last compute reading the slot finished

    def slot_of(self, layer: int) -> int:
        return layer % self.slot_count

    def copy(self, layer: int, copy_stream) -> None:
        """Fill the layer's slot on the copy stream, after the compute that last read the slot."""
        slot = self.slot_of(layer)
        with self.backend.on(copy_stream):
            self.backend.wait_event(self.released[slot], copy_stream)
            self.slots[slot].copy_(self.slabs[layer], non_blocking=self.backend.asynchronous)
            self.copied[slot] = self.backend.record(copy_stream)
        self.loaded[slot] = layer
        self.copied_bytes += self.layout.nbytes

    def bind(self, layer: int, copy_stream) -> None:
        """The layer's parameters point at its slot, once its copy has finished (for the compute stream)."""
        slot = self.slot_of(layer)
        if self.loaded[slot] != layer:
            self.copy(layer, copy_stream)
        self.backend.wait_event(self.copied[slot])
        for param, tensor in zip(self.params[layer], self.slot_views[slot]):
            param.data = tensor

    def prefetch(self, layer: int, ahead: int, copy_stream) -> None:
        """Copy the next layers into the other slots. Past the last layer the next pass's first layers come; when
        the layer count is not a multiple of the slot count one of them maps to the slot `layer` is about to read:
        that one waits."""
        slot = self.slot_of(layer)
        for step in range(1, ahead + 1):
            following = (layer + step) % len(self.params)
            target = self.slot_of(following)
            if target != slot and self.loaded[target] != following:
                self.copy(following, copy_stream)

    def release(self, layer: int) -> None:
        """After the layer's compute: its slot may be refilled once that compute has finished; its parameters
        point back at the host slab."""
        self.released[self.slot_of(layer)] = self.backend.record()
        for param, tensor in zip(self.params[layer], self.host[layer]):
            param.data = tensor

    def unbind(self) -> None:
        for params, host in zip(self.params, self.host):
            for param, tensor in zip(params, host):
                param.data = tensor


class LayerStreamer:
    def __init__(self, layers: nn.ModuleList, experts: dict[str, list[list[nn.Module]]], device: torch.device,
                 ahead: int = 2, backend: HostBackend | None = None):
        """`experts[name][i]`: the modules of expert `name` ("und"/"gen") in decoder layer i."""
        self.layers = layers
        self.backend = backend or backend_for(device)
        slot_count = min(ahead + 1, len(layers))
        self.experts = {name: ExpertStream(name, groups, self.backend, slot_count) for name, groups in experts.items()}
        self.copy_stream = self.backend.side_stream()
        self.running: dict[int, list[ExpertStream]] = {}   # layer -> the streams bound while it runs

    @property
    def slot_bytes(self) -> int:
        """Device bytes of the slots allocated now."""
        return sum(slot.numel() for stream in self.experts.values() for slot in stream.slots)

    @property
    def planned_slot_bytes(self) -> int:
        """Device bytes of the slots when they are allocated."""
        return sum(stream.layout.nbytes * stream.slot_count for stream in self.experts.values())

    def param_ids(self) -> set[int]:
        """The streamed parameters (between runs they point at the host slabs; they never move whole)."""
        return {id(param) for stream in self.experts.values() for params in stream.params for param in params}

    def allocate_slots(self, device: torch.device) -> None:
        for stream in self.experts.values():
            stream.allocate_slots(device)

    def free_slots(self) -> None:
        for stream in self.experts.values():
            stream.free_slots()

    @property
    def host_bytes(self) -> int:
        """Host bytes of the slabs (page-locked on CUDA)."""
        return sum(slab.numel() for stream in self.experts.values() for slab in stream.slabs)

    @property
    def copied_bytes(self) -> dict[str, int]:
        """Bytes copied to the device so far, per expert."""
        return {name: stream.copied_bytes for name, stream in self.experts.items()}

    @contextlib.contextmanager
    def active(self):
        """While active, each decoder layer finds the streamed weights of the experts it runs on the device."""
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
            for stream in self.experts.values():
                stream.reset()
                stream.unbind()
            self.running.clear()

    def _streams_of(self, args: tuple) -> list[ExpertStream]:
        """The streamed experts a layer call's routing runs: the major expert over the block, the other one only
        when some rows use it."""
        routing = next(arg for arg in args if isinstance(arg, Routing))
        names = ["gen" if routing.major_gen else "und"]
        if routing.minor_rows is not None:
            names.append("und" if routing.major_gen else "gen")
        return [self.experts[name] for name in names if name in self.experts]

    def _before(self, layer: int):
        def hook(module, args):
            streams = self.running[layer] = self._streams_of(args)
            for stream in streams:
                stream.bind(layer, self.copy_stream)
            for stream in streams:
                stream.prefetch(layer, len(stream.slots) - 1, self.copy_stream)
        return hook

    def _after(self, layer: int):
        def hook(module, args, output):
            for stream in self.running.pop(layer, []):
                stream.release(layer)
        return hook


def stream_experts(llm: nn.Module, experts: tuple[str, ...], device: torch.device, ahead: int = 2,
                   backend: HostBackend | None = None) -> LayerStreamer:
    """A streamer for the named experts of every decoder layer of `llm` (their weights move into host slabs)."""
    layers = llm.language_model.model.layers
    groups = {expert: [layer.expert_modules(expert == "gen") for layer in layers] for expert in experts}
    return LayerStreamer(layers, groups, device, ahead, backend)
