"""The CUDA calls of the GPU-only mechanisms, behind one small object per device.

Streamed weights (side copy stream, events, pinned host memory) and the decode step's CUDA graph (warm-up on a
side stream, capture, replay) are written once, against a backend: `CudaBackend` makes the CUDA calls, always
under the module's own device (a model on cuda:1 must get streams and graphs of cuda:1, not of the current
device); `HostBackend` is the same code on the CPU minus those calls: work is synchronous (no streams or events),
nothing is page-locked, and a "graph" runs its step again at every replay. So the CPU tests run the real arithmetic,
buffers and bookkeeping of every GPU path (the tests named `rehearsal`), and a GPU only has to confirm them.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch

from .devices import indexed

WARMUP_STEPS = 2   # eager runs on a side stream before a capture (lazy initialisation, kernel autotuning)


class HostBackend:
    """CPU (and any device without streams): synchronous, nothing to record or wait for."""

    asynchronous = False   # copies may be issued non_blocking (the host does not wait for them)

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    # -- streams and events ----------------------------------------------------------------------------
    def context(self):
        """Makes this backend's device the current one (where a library call creates streams and graphs)."""
        return contextlib.nullcontext()

    def side_stream(self):
        return None

    def current_stream(self):
        return None

    def on(self, stream):
        """Work issued inside runs on `stream`."""
        return contextlib.nullcontext()

    def record(self, stream=None):
        """An event marking the work issued on `stream` (None: the current stream) so far."""
        return None

    def wait_event(self, event, stream=None) -> None:
        """`stream` (None: the current stream) waits until `event`'s work has finished."""

    def wait_stream(self, waiting, other) -> None:
        """`waiting` waits until what was issued on `other` so far has finished."""

    def synchronize(self, stream=None) -> None:
        """The host waits for `stream` (None: the current stream)."""

    # -- memory ----------------------------------------------------------------------------------------
    def register(self, tensor: torch.Tensor):
        """Lets the device copy from host `tensor` asynchronously (on CUDA: page-locks its memory in place, no copy)
        while the returned handle lives."""
        return None

    def empty_cache(self) -> None:
        """Return the allocator's unused cached blocks to the device."""

    # -- graphs ----------------------------------------------------------------------------------------
    def capture(self, step: Callable[[], torch.Tensor], state: list[torch.Tensor]) -> "Graph":
        """A graph of `step` (one call, static shapes, its output a tensor it rewrites at every replay).

        `state`: the buffers `step` reads and advances (its inputs from one call to the next). The warm-up runs
        each start from the state as it is now and it is restored after them, so they touch only what the first
        replay touches; the capture itself runs nothing, so the first replay performs the first step. On failure
        the state is as it was and the error propagates (the caller decides to run eagerly)."""
        saved = [tensor.clone() for tensor in state]

        def restore() -> None:
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
        try:
            with self.context():
                side = self.side_stream()
                self.wait_stream(side, self.current_stream())
                with self.on(side):
                    for _ in range(WARMUP_STEPS):
                        step()
                        restore()
                self.wait_stream(self.current_stream(), side)
                return self._record(step, restore)
        except BaseException:
            restore()
            raise

    def _record(self, step, restore) -> "Graph":
        # the rehearsal of a capture: run once for the static output, then leave the state as a capture (which
        # records kernels without running them) leaves it
        output = step()
        restore()
        return HostGraph(step, output)


class Graph:
    """A captured step: `replay()` runs it once more and returns its static output tensor."""

    def replay(self) -> torch.Tensor:
        raise NotImplementedError


class HostGraph(Graph):
    def __init__(self, step: Callable[[], torch.Tensor], output: torch.Tensor):
        self.step, self.output = step, output

    def replay(self) -> torch.Tensor:
        self.output.copy_(self.step())
        return self.output


class CudaBackend(HostBackend):
    """The same operations on one CUDA device (`cuda:N`), every call made under that device."""

    asynchronous = True

    def __init__(self, device: torch.device):
        super().__init__(indexed(device))

    def context(self):
        return torch.cuda.device(self.device)

    def side_stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def on(self, stream):
        return torch.cuda.stream(stream)

    def record(self, stream=None):
        event = torch.cuda.Event()
        event.record(stream if stream is not None else self.current_stream())
        return event

    def wait_event(self, event, stream=None) -> None:
        if event is not None:
            (stream if stream is not None else self.current_stream()).wait_event(event)

    def wait_stream(self, waiting, other) -> None:
        waiting.wait_stream(other)

    def synchronize(self, stream=None) -> None:
        (stream if stream is not None else self.current_stream()).synchronize()

    def register(self, tensor: torch.Tensor) -> "PageLock":
        return PageLock(tensor)

    def empty_cache(self) -> None:
        with self.context():
            torch.cuda.empty_cache()

    def _record(self, step, restore) -> Graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.side_stream()):
            output = step()
        return CudaGraph(graph, output, self)


class PageLock:
    """Keeps a host tensor's memory page-locked (cudaHostRegister) while this object lives, and unlocks it before
    the memory can be freed: the object holds the tensor, and its finalizer runs before its attributes go."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
        if error != cudart.cudaError.success:
            raise RuntimeError(f"cudaHostRegister failed: {cudart.cudaGetErrorString(error)}")
        weakref.finalize(self, _unregister, tensor.data_ptr())


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class CudaGraph(Graph):
    def __init__(self, graph, output: torch.Tensor, backend: CudaBackend):
        self.graph, self.output, self.backend = graph, output, backend

    def replay(self) -> torch.Tensor:
        with self.backend.context():
            self.graph.replay()
        return self.output


def backend_for(device: torch.device) -> HostBackend:
    device = torch.device(device)
    return CudaBackend(device) if device.type == "cuda" else HostBackend(device)
