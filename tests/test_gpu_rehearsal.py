"""Rehearsals of the GPU-only paths on the CPU (`-k rehearsal`; ../shared/design/gpu-rehearsal.md).

The decode step's CUDA graph (warm-up, capture, replay), the streamed weights' copy stream and events, and the
device and memory queries behind every memory check are written against one seam (lance_model/runtime/device_backend.py).
Here that seam runs its CPU half, so the real arithmetic, buffers and bookkeeping run; where only CUDA's rules
matter (which device a stream belongs to, which torch.cuda calls demand an index) CUDA is made to look present
(tests/fixtures/fake_cuda.py). tests/test_cuda.py settles the same paths on a GPU.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace

import pytest
import torch

from lance_model import OutOfMemory
from lance_model.runtime import decode_step as decode_step_module
from lance_model.runtime.decode_step import DecodeStep, TokenChooser, cuda_graphs_usable, static_weights
from lance_model.runtime.device_backend import CudaBackend, HostBackend
from lance_model.runtime.devices import resolve_device
from lance_model.runtime.memory import Estimate, available_bytes
from lance_model.runtime.streaming import stream_experts
from lance_model.tasks.understanding import SamplingOptions, decode, prompt_embeddings, understanding_sequence
from lance_model.runtime.vram_plan import DEVICE_MARGIN, WeightBytes, candidates, device_budget, working_reserve
from lance_model.nn.llm import LanceLLM
from lance_model.runtime.loader import pick_plan
from tests.fixtures.fake_cuda import GIB, FakeCudaMemory, FakeCudaRuntime


class CountingBackend(HostBackend):
    """The CPU backend, counting captures and replays (so a test knows the graph path really ran)."""

    def __init__(self, device, fail_capture: BaseException | None = None):
        super().__init__(device)
        self.captures, self.replays, self.fail_capture = 0, 0, fail_capture

    def _record(self, step, restore):
        if self.fail_capture is not None:
            raise self.fail_capture
        self.captures += 1
        graph = super()._record(step, restore)
        replay = graph.replay

        def counted():
            self.replays += 1
            return replay()
        graph.replay = counted
        return graph


@pytest.fixture
def backend(pipe, monkeypatch):
    """Every decode step of the test uses one CountingBackend."""
    counting = CountingBackend(pipe.llm.device)
    monkeypatch.setattr(decode_step_module, "backend_for", lambda device: counting)
    return counting


def greedy(pipe, max_new_tokens: int, cuda_graph: bool):
    seq = understanding_sequence(pipe.tokenizer, pipe.config, "Describe.", "a red cat", None)
    return decode(pipe.llm, seq, prompt_embeddings(pipe.llm, seq, []), max_new_tokens=max_new_tokens, stop_ids=set(),
                  vocab_limit=pipe.tokenizer.vocab_limit, cuda_graph=cuda_graph, keep_logits=True)


# ---------------------------------------------------------------- the decode step's graph
@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4, 12])
def test_rehearsal_decode_graph_equals_eager_for_every_answer_length(pipe, backend, max_new_tokens):
    """Warm-up, capture and replay run on the CPU with the step's static buffers. Two warm-up steps used to
    advance the slot past the end of `ids` at max_new_tokens == 2 (on CUDA a device-side assert that kills the
    context)."""
    graphed = greedy(pipe, max_new_tokens, cuda_graph=True)
    eager = greedy(pipe, max_new_tokens, cuda_graph=False)
    assert graphed.ids == eager.ids and len(eager.ids) == max_new_tokens
    assert torch.equal(graphed.logits, eager.logits)
    steps = max_new_tokens - 1   # the first token comes from the prompt's logits
    assert (backend.captures, backend.replays) == ((1, steps) if steps else (0, 0))


def test_rehearsal_capture_leaves_the_step_state_as_it_was(pipe):
    seq = understanding_sequence(pipe.tokenizer, pipe.config, "Describe.", "a red cat", None)
    prompt = len(seq)
    cache = pipe.llm.new_cache(1, prompt + 2)   # the tightest capacity: one step after the first token
    chooser = TokenChooser(SamplingOptions(), pipe.tokenizer.vocab_limit, pipe.config.vocab_size, pipe.llm.device)
    with torch.inference_mode():
        from lance_model.nn.llm import prefill_splits
        hidden = prefill_splits(pipe.llm, prompt_embeddings(pipe.llm, seq, []), seq.positions, seq.splits,
                                seq.gen_mask, cache)
        step = DecodeStep(pipe.llm, cache, prompt, prompt, chooser, use_graph=True, backend=HostBackend("cpu"))
        step.first(pipe.llm.logits(hidden[:, -1:]))
        before = [t.clone() for t in (step.token, step.slot, step.valid, step.ids)]
        step._capture()
        assert all(torch.equal(a, b) for a, b in zip(before, (step.token, step.slot, step.valid, step.ids)))
        step()
        assert int(step.slot) == prompt + 1


def test_rehearsal_failed_capture_decodes_eagerly_with_one_log_line(pipe, monkeypatch, caplog):
    failing = CountingBackend(pipe.llm.device, RuntimeError("operation not permitted when stream is capturing"))
    monkeypatch.setattr(decode_step_module, "backend_for", lambda device: failing)
    with caplog.at_level(logging.WARNING, logger="lance_model.runtime.decode_step"):
        graphed = greedy(pipe, 6, cuda_graph=True)
    assert graphed.ids == greedy(pipe, 6, cuda_graph=False).ids
    assert [r.getMessage() for r in caplog.records if "capture" in r.getMessage()] == [
        "CUDA graph capture of the decode step failed (operation not permitted when stream is capturing): "
        "decoding runs eagerly"]


def test_rehearsal_out_of_memory_during_capture_is_not_hidden(pipe, monkeypatch):
    failing = CountingBackend(pipe.llm.device, torch.OutOfMemoryError("CUDA out of memory"))
    monkeypatch.setattr(decode_step_module, "backend_for", lambda device: failing)
    with pytest.raises(torch.OutOfMemoryError):
        greedy(pipe, 4, cuda_graph=True)


# ---------------------------------------------------------------- when a graph may be captured
def test_graphs_only_over_weights_resident_on_the_execution_device(pipe, monkeypatch):
    """Under a host's partial or dynamic loading the LLM runs on the GPU while weights stay in host memory and
    are copied in per call: such a step cannot be captured (copies from pageable memory are refused while a
    stream captures) and must decode eagerly."""
    FakeCudaMemory(monkeypatch)
    monkeypatch.setattr(pipe.llm, "execution_device", torch.device("cuda", 0))
    assert not cuda_graphs_usable(pipe.llm)


def test_static_weights_sees_host_casting(pipe):
    llm = copy.deepcopy(pipe.llm)
    assert static_weights(llm, torch.device("cpu"))
    linear = llm.language_model.model.layers[0].mlp.up_proj
    linear.weight_function = [lambda weight: weight]   # a low-VRAM LoRA patch applied at cast time
    assert not static_weights(llm, torch.device("cpu"))
    linear.weight_function = []
    linear._v = object()                               # a Dynamic VRAM weight buffer
    assert not static_weights(llm, torch.device("cpu"))
    del linear._v
    llm.language_model.model.norm.to("meta")   # one weight left elsewhere
    assert not static_weights(llm, torch.device("cpu"))


# ---------------------------------------------------------------- CUDA calls bound to the model's device
def test_cuda_backend_makes_every_call_under_the_models_device(monkeypatch):
    """A model on cuda:1 while cuda:0 is current: streams, the capture, replays and cache releases all belong
    to cuda:1 (a capture on another device's stream records nothing, and its replays do nothing)."""
    memory = FakeCudaMemory(monkeypatch, count=2, current=0)
    runtime = FakeCudaRuntime(monkeypatch, memory)
    backend = CudaBackend(torch.device("cuda", 1))
    counter = torch.zeros(1)
    graph = backend.capture(lambda: counter.add_(1).clone(), [counter])
    graph.replay()
    backend.empty_cache()
    event = backend.record(backend.side_stream())
    assert {stream.device for stream in runtime.streams} == {torch.device("cuda", 1)}
    assert [(current, stream.device) for current, stream in runtime.captures] == [(1, torch.device("cuda", 1))]
    assert runtime.replays == [1] and runtime.cache_releases == [1]
    assert event.device == torch.device("cuda", 1)
    assert memory.current == 0   # the caller's current device is left as it was
    assert CudaBackend(torch.device("cuda")).device == torch.device("cuda", 0)


# ---------------------------------------------------------------- devices and memory queries
def test_rehearsal_devices_resolve_with_their_index(monkeypatch):
    memory = FakeCudaMemory(monkeypatch, count=2, current=1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    memory.devices[1].fraction = 0.5
    with pytest.raises(ValueError, match="specified index"):   # the real rule the stand-ins enforce
        torch.cuda.get_per_process_memory_fraction(torch.device("cuda"))
    assert available_bytes(torch.device("cuda")) == available_bytes(torch.device("cuda", 1)) == 8 * GIB


def test_rehearsal_memory_check_of_a_cuda_session(pipe, monkeypatch):
    """Every task's first act, session.check, on a session whose device came from resolve_device("cuda")."""
    memory = FakeCudaMemory(monkeypatch, count=1)
    monkeypatch.setattr(pipe.session, "device", resolve_device("cuda"))
    pipe.session.check(Estimate().add("sampling", "KV cache", GIB))
    memory.devices[0].fraction = 0.05
    with pytest.raises(OutOfMemory, match="cuda:0"):
        pipe.session.check(Estimate().add("sampling", "KV cache", GIB))


@pytest.mark.parametrize("index", range(len(candidates())))
def test_rehearsal_auto_plan_budget_from_a_capped_cuda_device(pipe, monkeypatch, index):
    """memory='auto' at load: the budget comes from the device's memory within its per-process fraction (as a
    bench or a host caps it), minus the margin; the plan picked is the fastest that fits."""
    memory = FakeCudaMemory(monkeypatch, count=1)
    llm, vit, vae = pipe.llm, pipe.vit, pipe.vae
    sizes = WeightBytes.of(llm, vit.module, vae.module)
    working = working_reserve(llm.config, int(vae.module.config.decoder_base_dim), llm.dtype)
    fits = sizes.device_bytes(candidates()[index]) + working + DEVICE_MARGIN
    memory.devices[0].fraction = fits / memory.devices[0].total
    device = resolve_device("cuda")
    assert device_budget(device) == fits - DEVICE_MARGIN
    fastest = next(plan for plan in candidates() if sizes.device_bytes(plan) + working <= fits - DEVICE_MARGIN)
    assert pick_plan("auto", llm, vit, vae, device, None, ()) == fastest


# ---------------------------------------------------------------- streamed weights: slots and event order
class RecordingBackend(HostBackend):
    """The CPU backend, logging the event operations a streamer issues (streams by name, events by number)."""

    def __init__(self, device):
        super().__init__(device)
        self.log: list[tuple] = []

    def side_stream(self):
        return "copy"

    def record(self, stream=None):
        event = len(self.log)
        self.log.append(("record", event, stream))
        return event

    def wait_event(self, event, stream=None) -> None:
        self.log.append(("wait", event, stream))

    def synchronize(self, stream=None) -> None:
        self.log.append(("synchronize", stream))


def test_rehearsal_streamed_layers_wait_for_their_copy_and_copies_wait_for_the_compute(pipe):
    """Replays the event log of a streamed answer (prefill + decode steps): each expert's weights are bound for a
    layer only after waiting for the event recorded after the copy of THAT layer into its slot; each copy into a
    slot waits for the event recorded after the last compute that read the slot; the run ends by draining both
    streams."""
    llm = copy.deepcopy(pipe.llm)
    backend = RecordingBackend(llm.device)
    streamer = stream_experts(llm, ("und", "gen"), llm.device, backend=backend)
    streamer.allocate_slots(llm.device)
    for name, stream in streamer.experts.items():
        def logged(method, tag, name=name, stream=stream):
            def call(layer, *args):
                backend.log.append((tag, name, layer, stream.slot_of(layer)))
                return method(layer, *args)
            return call
        stream.copy, stream.release = logged(stream.copy, "copy"), logged(stream.release, "release")
        stream.bind = logged(stream.bind, "bind")
    seq = understanding_sequence(pipe.tokenizer, pipe.config, "Describe.", "a red cat", None)
    with streamer.active(), torch.inference_mode():
        answer = decode(llm, seq, prompt_embeddings(llm, seq, []), max_new_tokens=3, stop_ids=set(),
                        vocab_limit=pipe.tokenizer.vocab_limit, cuda_graph=False)
    assert answer.ids == greedy(pipe, 3, cuda_graph=False).ids

    log = backend.log
    copied, released, holds = {}, {}, {}   # (expert, slot) -> its copy's event, its last compute's event, its layer
    binds, binding = 0, None
    for number, entry in enumerate(log):
        if entry[0] == "copy":
            key = entry[1], entry[3]
            assert log[number + 1] == ("wait", released.get(key), "copy"), (number, entry)
            record = log[number + 2]
            assert record[0] == "record" and record[2] == "copy"
            copied[key], holds[key] = record[1], entry[2]
        elif entry[0] == "bind":   # its own copy, if the slot lacks the layer, comes first, then its wait
            binding = entry
        elif entry[0] == "wait" and entry[2] is None:
            key = binding[1], binding[3]
            assert holds[key] == binding[2] and entry == ("wait", copied[key], None), (number, binding)
            binds, binding = binds + 1, None
        elif entry[0] == "release":
            record = log[number + 1]
            assert record[0] == "record" and record[2] is None
            released[entry[1], entry[3]] = record[1]
    assert binds >= 2 * len(llm.language_model.model.layers)
    assert log[-2:] == [("synchronize", "copy"), ("synchronize", None)]
    # an answer runs the understanding expert only: the generation expert is never copied
    assert streamer.copied_bytes["und"] > 0 and streamer.copied_bytes["gen"] == 0


def llm_with_layers(pipe, layers: int) -> LanceLLM:
    """A random LLM of the fixture's configuration with another layer count."""
    torch.manual_seed(0)
    return LanceLLM(replace(pipe.config, num_layers=layers)).eval().requires_grad_(False)


@pytest.mark.parametrize("layers,ahead", [(4, 2), (5, 2), (5, 3), (3, 1)])
def test_rehearsal_streamed_equals_resident_whatever_the_layer_count(pipe, layers, ahead):
    """With a layer count that is not a multiple of the slot count, a prefetch past the last layer maps the next
    pass's first layer onto the slot the last layer is about to read; it must wait instead of overwriting it."""
    resident = llm_with_layers(pipe, layers)
    streamed = copy.deepcopy(resident)
    streamer = stream_experts(streamed, ("und", "gen"), streamed.device, ahead)
    streamer.allocate_slots(streamed.device)
    seq = understanding_sequence(pipe.tokenizer, pipe.config, "Describe.", "a red cat", None)

    def answer(llm):
        return decode(llm, seq, prompt_embeddings(llm, seq, []), max_new_tokens=4, stop_ids=set(),
                      vocab_limit=pipe.tokenizer.vocab_limit, cuda_graph=False, keep_logits=True).logits
    with streamer.active():
        ours = answer(streamed)
    assert torch.equal(ours, answer(resident))



def test_rehearsal_page_lock_registers_in_place_and_unregisters_before_the_memory_goes(monkeypatch):
    """Streamed slabs are page-locked where they are (no copy, exactly their size) for as long as the lock lives;
    the lock holds the slab, so its memory is unregistered before it can be freed and reused."""
    import gc
    from types import SimpleNamespace

    from lance_model.runtime.device_backend import PageLock

    calls = []

    class FakeCudart:
        cudaError = SimpleNamespace(success=0)

        @staticmethod
        def cudaHostRegister(pointer, size, flags):
            calls.append(("register", pointer, size))
            return 0 if size else 1

        @staticmethod
        def cudaHostUnregister(pointer):
            calls.append(("unregister", pointer))
            return 0

        @staticmethod
        def cudaGetErrorString(error):
            return "invalid value"
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart)
    slab = torch.empty(4096, dtype=torch.uint8)
    pointer = slab.data_ptr()
    lock = PageLock(slab)
    assert calls == [("register", pointer, 4096)]
    del slab
    gc.collect()
    assert len(calls) == 1 and lock.tensor.data_ptr() == pointer   # the lock keeps the memory alive
    del lock
    gc.collect()
    assert calls[-1] == ("unregister", pointer)
    with pytest.raises(RuntimeError, match="cudaHostRegister failed: invalid value"):
        PageLock(torch.empty(0, dtype=torch.uint8))
