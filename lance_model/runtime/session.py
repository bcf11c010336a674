"""One loaded Lance release and what every call on it shares.

The session holds the modules (LLM, ViT, VAE), the tokenizer, device/dtype/memory mode, the host's hooks, the
stores kept across runs and the release's file snapshot. It runs one call at a time (`task`: the call lock, the
host's hook told what the call needs, and a torch out-of-memory error turned into `OutOfMemory` after what the call
held is freed), brings a module's weights that are off the device there while its stage runs and sends them back
afterwards (offload mode; the ViT and VAE under a VRAM plan that stages them, or left in host memory by a host),
streams the LLM layers a plan streams, polls `cancel` inside long stages, checks memory estimates before work
starts and retries a VAE stage tiled when it runs out of memory. Where the library places the weights (a plan,
offload mode) a host can take what it keeps on the device off it between calls and learn its size
(offload_weights, device_bytes); the next call that needs them places them again.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import threading
from typing import Callable, TypeVar

import torch
from torch import nn

from ..errors import OutOfMemory, first_line
from ..nn.checkpoint import ReleasePaths
from ..nn.llm import LanceLLM
from ..nn.tokenizer import LanceTokenizer
from ..nn.vae import LanceVAE
from ..nn.vit import LanceViT
from .device_backend import backend_for
from .devices import indexed
from .encode_store import EncodeStore
from .interrupt import cancel_hooks
from .memory import HINT, Estimate
from .prefix_store import PrefixStore
from .streaming import LayerStreamer
from .vram_plan import VramPlan, move_weights

log = logging.getLogger(__name__)
T = TypeVar("T")

# what a call needs (the host's before_call and make_room hooks are told): any module, or only the VAE
SCOPE_ALL, SCOPE_VAE = "all", "vae"

# resident: every weight on the device; offload: each stage (ViT, LLM, VAE) visits the device only while it runs;
# stream: the LLM's layers stream from host memory, ViT and VAE visit as stages; auto: a VRAM plan (vram_plan.py)
MEMORY_MODES = ("resident", "offload", "stream", "auto")


class LanceSession(nn.Module):
    def __init__(self, paths: ReleasePaths, llm: LanceLLM, tokenizer: LanceTokenizer, vit: LanceViT, vae: LanceVAE,
                 memory: str, execution_device: torch.device, file_state: dict, plan: VramPlan | None = None,
                 streamer: LayerStreamer | None = None):
        super().__init__()
        self.lock = threading.RLock()
        self.call_depth = 0   # nested task calls (the host's before_call runs before the outermost one)
        self.scope = SCOPE_ALL   # what the running call needs: SCOPE_ALL, or SCOPE_VAE (only the VAE runs)
        # host hooks: before_call(scope) runs before every outermost call (ComfyUI: load the weights to the GPU
        # for SCOPE_ALL); make_room(bytes, device, scope) when a request's estimate exceeds the free memory, before
        # it is refused (ComfyUI: unload other models, and this one too for SCOPE_VAE); weights_version() changes
        # whenever the host changes the weights in place (ComfyUI: the weight patches applied) and is part of the
        # stores' keys
        self.before_call: Callable[[str], None] | None = None
        self.make_room: Callable[[int, torch.device, str], None] | None = None
        self.weights_version: Callable[[], object] = lambda: None
        self.prefixes = PrefixStore()   # the last request's prefilled prefixes (prefix_store.py)
        self.encodings = EncodeStore()  # recent source media's VAE posteriors and ViT embeddings (encode_store.py)
        self.paths, self.tokenizer, self.file_state = paths, tokenizer, file_state
        self.llm = llm
        self.vit_module, self.vae_module = vit.module, vae.module   # registered: .to() and state_dict see them
        self.vit, self.vae = vit, vae
        self.memory, self.plan, self.streamer = memory, plan, streamer
        # modules whose weights off the device visit it while their stage runs: the ViT and VAE (kept in host
        # memory by offload mode or a plan's stages, or left there by a host), the LLM in offload mode (otherwise
        # its weights stay where ComfyUI's casting layers or the plan's streamer expect them)
        self.visitors = {id(vit.module), id(vae.module)} | ({id(llm)} if memory == "offload" else set())
        self.evicted: set[int] = set()   # modules sent to the CPU by a memory fallback, back when they next run
        # what the library keeps on the device is there; a plan's weights come loaded in host memory and stay
        # there until place_weights
        self.weights_placed = plan is None
        self.device = indexed(execution_device)   # cuda:N: streams, caches and memory queries belong to one GPU
        self.backend = backend_for(self.device)
        llm.execution_device = self.device
        self.model_id = fingerprint(paths)

    @property
    def config(self):
        return self.llm.config

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def changed_files(self) -> list[str]:
        now = self.paths.snapshot()
        return [path for path, state in self.file_state.items() if now.get(path) != state]

    # -- memory -----------------------------------------------------------------------------------------
    def check(self, estimate: Estimate) -> None:
        """Refuse a request that cannot fit (after asking the host to make room), naming the weight plan. In a
        VAE-only call the host may make room by unloading this model too, VAE included: the VAE weights it sends
        off the device come back for the stage, so the estimate is checked again with them."""
        plan = f"weights: {self.plan.describe()}" if self.plan is not None else f"memory mode {self.memory}"
        make_room = None if self.make_room is None else (lambda need, device: self.make_room(need, device, self.scope))
        while True:
            away = self.stage_weights(self.vae_module) if self.scope == SCOPE_VAE else 0
            estimate.check(self.device, make_room=make_room, plan=plan)
            sent_off = (self.stage_weights(self.vae_module) if self.scope == SCOPE_VAE else 0) - away
            if sent_off <= 0:
                return
            estimate.add(estimate.peak()[0], "VAE weights sent off to make room", sent_off)

    def stage_weights(self, module: nn.Module) -> int:
        """Bytes a module's weights add on the device while its stage runs: those that visit it (a tied weight
        counts once)."""
        away = {id(tensor): tensor for layer, _ in self._away(module) for tensor in own_tensors(layer)
                if tensor.device != self.device}
        return sum(tensor.numel() * tensor.element_size() for tensor in away.values())

    def free_for_fallback(self) -> None:
        """Before a memory fallback: the VAE's frame cache, unreferenced tensors and cached blocks go back to the
        device, and a resident LLM placed by the library (not by a host) leaves the device (it comes back when it
        next runs)."""
        self.vae_module.clear_cache()
        if self.places_weights and id(self.llm) not in self.visitors and self.streamer is None \
                and self.device.type != "cpu" and on_device(self.llm, self.device):
            self.llm.to("cpu")
            self.evicted.add(id(self.llm))
        gc.collect()
        self.backend.empty_cache()

    def tiled_fallback(self, run: Callable[[], T], what: str,
                       give_up: Callable[[str], BaseException] | None = None) -> T:
        """`run` (a VAE stage, with the VAE as it is set); when it runs out of memory untiled, what it held is freed
        and it runs again with the VAE tiled (less memory, slightly other pixels). When that fails too, or the VAE
        was tiled already, `give_up(what was tried)` is raised (default: OutOfMemory saying what to do)."""
        failures = []
        for tiled in (False, True) if not self.vae.tiling_enabled else (True,):
            if failures:
                log.warning("%s ran out of memory %s: retrying with the VAE tiled", what, failures[-1])
            try:
                with self.vae.tiled(tiled):
                    return run()
            except (torch.OutOfMemoryError, OutOfMemory) as exc:
                detail = exc.facts if isinstance(exc, OutOfMemory) else first_line(exc, type(exc).__name__)
                failures.append(f"{'tiled' if tiled else 'untiled'} ({detail})")
            # outside the except block: the error's traceback (and the tensors its frames hold) is gone
            self.free_for_fallback()
        tried = " and ".join(failures)
        if give_up is not None:
            raise give_up(tried)
        facts = f"{what} ran out of memory on {self.device}, {tried}"
        raise OutOfMemory(f"{facts}; free device memory (other models, other programs) and run it again, or pass a "
                          f"smaller batch, fewer frames or a smaller size. The model is still loaded and usable.",
                          facts)

    def release_scratch(self) -> None:
        """After a failed or cancelled call: drop the VAE's frame cache, the stores and unreferenced tensors."""
        self.vae_module.clear_cache()
        self.prefixes.clear()
        self.encodings.clear()
        gc.collect()
        self.backend.empty_cache()

    # -- where the weights are between calls -------------------------------------------------------------
    @property
    def places_weights(self) -> bool:
        """Whether the library decides where the weights are: always with a plan or in offload mode; in resident
        mode only when no host hooks in (ComfyUI's patcher manages a resident model's weights, layer by layer)."""
        return self.memory != "resident" or self.plan is not None or self.before_call is None

    def placed_modules(self) -> list[nn.Module]:
        """Every module whose own weights the library keeps on the device between calls: the LLM's unless offload
        mode stages it (a plan's streamed experts aside: they live in host slabs), the ViT's and VAE's unless they
        visit as stages."""
        staged = self.memory == "offload" or (self.plan is not None and self.plan.stages)
        trees = ([] if self.memory == "offload" else [self.llm]) + \
            ([] if staged else [self.vit_module, self.vae_module])
        return [module for tree in trees for module in tree.modules()]

    def device_bytes(self, planned: bool = False) -> int:
        """Bytes the library keeps on the device between calls (weights and stream slots): those there now (0 while
        offloaded), or (`planned`) those that placing the weights puts there."""
        if not planned and not self.weights_placed:
            return 0
        streamed = self._streamed()
        tensors = {id(tensor): tensor for module in self.placed_modules() for tensor in own_tensors(module)
                   if id(tensor) not in streamed and (planned or tensor.device == self.device)}
        slots = 0 if self.streamer is None else \
            self.streamer.planned_slot_bytes if planned else self.streamer.slot_bytes
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()) + slots

    def offload_weights(self) -> None:
        """Take what the library keeps on the device off it: the placed weights go to host memory, the stream slots
        and the stores (device tensors) are dropped. A host does this to give the memory to another model; the next
        call that runs the LLM or the ViT places the weights again (place_weights). Only for a session that
        places its weights (places_weights)."""
        with self.lock:
            if not self.weights_placed:
                return
            self.weights_placed = False
            self._to_host()
            self.release_scratch()

    def place_weights(self) -> None:
        """Put on the device what the library keeps there (after offload_weights or a deferred placement; a
        resident LLM that a memory fallback evicted comes back with it). When the device runs out of memory on the
        way, what got there goes back to host memory before the error propagates."""
        with self.lock:
            if self.weights_placed:
                return
            try:
                move_weights(self.placed_modules(), self.device, self._streamed())
                if self.streamer is not None:
                    self.streamer.allocate_slots(self.device)
            except BaseException:
                self._to_host()
                raise
            self.evicted.clear()
            self.weights_placed = True

    def _to_host(self) -> None:
        move_weights(self.placed_modules(), torch.device("cpu"), self._streamed())
        if self.streamer is not None:
            self.streamer.free_slots()

    def _streamed(self) -> set[int]:
        return self.streamer.param_ids() if self.streamer is not None else set()

    # -- stages -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, module: nn.Module, cancel: Callable[[], bool] | None = None):
        """`module` (the LLM, the ViT or the VAE) runs on the execution device, polling `cancel` inside."""
        streaming = self.streamer.active() if module is self.llm and self.streamer is not None else contextlib.nullcontext()
        with self._placed(module), streaming, cancel_hooks(self._cancel_points(module), cancel):
            yield

    @contextlib.contextmanager
    def _placed(self, module: nn.Module):
        """The module's weights that are off the device visit it while its stage runs, and go back where they were
        afterwards: a staged module's weights live in host memory, and a ViT or VAE that a host left there
        (ComfyUI's partial low-VRAM load moves only what fits and never casts layers not built from its ops) is
        treated alike, so that the host's account of where its weights are stays true. A resident LLM that a memory
        fallback evicted comes back to stay."""
        if id(module) in self.evicted:
            module.to(self.device)
            self.evicted.discard(id(module))
        away = self._away(module)
        try:
            for layer, _ in away:
                move_weights([layer], self.device)
            yield
        finally:
            for layer, home in away:
                move_weights([layer], home)
            if away:
                self.backend.empty_cache()

    def _away(self, module: nn.Module) -> list[tuple[nn.Module, torch.device]]:
        """(layer, device) of each layer of a visiting module whose own weights (parameters, buffers) are off the
        device, and where they are (hosts move whole layers)."""
        if id(module) not in self.visitors:
            return []
        away = []
        for layer in module.modules():
            homes = [tensor.device for tensor in own_tensors(layer) if tensor.device != self.device]
            if homes:
                away.append((layer, homes[0]))
        return away

    def _cancel_points(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """Where a long stage polls: every LLM layer (and every LLM forward where denoising steps are compiled: they
        call their layers without hooks), every ViT block, every VAE decoder/encoder call (the Wan VAE calls its
        decoder once per latent frame and its encoder once per chunk of frames)."""
        if module is self.llm:
            layers = [(f"LLM layer {i}", layer) for i, layer in enumerate(self.llm.language_model.model.layers)]
            return ([("LLM forward", self.llm)] if self.llm.compiles_steps else []) + layers
        if module is self.vit_module:
            return [(f"ViT block {i}", block) for i, block in enumerate(self.vit_module.blocks)]
        return [("VAE decode", module.decoder), ("VAE encode", module.encoder)]


def task(method=None, *, scope: str = SCOPE_ALL):
    """A public task method of an object with a `session`: one call at a time per session (the VAE's frame
    cache and the modules' device moves are shared state); the host's before_call hook runs first, told what the
    call needs (`scope`: SCOPE_ALL, or SCOPE_VAE for a method that runs only the VAE); a torch out-of-memory error
    becomes `OutOfMemory` after what the call held is freed. `@task` or `@task(scope=SCOPE_VAE)`."""
    if method is None:
        return functools.partial(task, scope=scope)

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        session: LanceSession = self.session
        with session.lock:
            outermost = session.call_depth == 0
            session.call_depth += 1
            try:
                if outermost:
                    session.scope = scope
                    if session.before_call is not None:
                        session.before_call(scope)
                    if scope == SCOPE_ALL:
                        session.place_weights()   # after a host offloaded them (when it did not place them again)
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as exc:
                detail = first_line(exc, "out of memory")
            except BaseException:
                session.release_scratch()
                raise
            finally:
                session.call_depth -= 1
                if outermost:
                    session.scope = SCOPE_ALL
            # outside the except block: the torch error's traceback (and the tensors its frames hold) is gone
            session.release_scratch()
            facts = f"{method.__name__} ran out of memory on {session.device} ({detail})"
            raise OutOfMemory(f"{facts}; {HINT}. The model is still loaded and usable.", facts)
    return run


def on_device(module: nn.Module, device: torch.device) -> bool:
    """True when all of the module's weights are on `device`."""
    device = indexed(device)
    return all(p.device == device for p in module.parameters())


def own_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers a module holds itself (not its children's)."""
    return [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]


def fingerprint(paths: ReleasePaths) -> str:
    stat = paths.llm_weights.stat()
    digest = hashlib.sha1(f"{paths.llm_weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{paths.lance_dir.name}@{digest}"
