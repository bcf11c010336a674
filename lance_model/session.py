"""One loaded Lance release and what every call on it shares.

The session holds the modules (LLM, ViT, VAE), the tokenizer, device/dtype/memory mode, the host's hooks, the
stores kept across runs and the release's file snapshot. It runs one call at a time (`task`: the call lock, and
a torch out-of-memory error turned into `OutOfMemory` after what the call held is freed), moves a staged module's
weights to the device while its stage runs (offload mode; the ViT and VAE under a VRAM plan that stages them),
streams the LLM layers a plan streams, polls `cancel` inside long stages, and checks memory estimates before work
starts.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import threading
from typing import Callable

import torch
from torch import nn

from .checkpoint import ReleasePaths
from .encode_store import EncodeStore
from .errors import OutOfMemory, first_line
from .interrupt import cancel_hooks
from .llm import LanceLLM
from .memory import HINT, Estimate, module_bytes
from .prefix_store import PrefixStore
from .streaming import LayerStreamer
from .tokenizer import LanceTokenizer
from .vae import LanceVAE
from .vit import LanceViT
from .vram_plan import VramPlan

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
        # host hooks: before_call() runs before every outermost call (ComfyUI: load the weights to the GPU);
        # make_room(bytes, device) when a request's estimate exceeds the free memory, before it is refused
        # (ComfyUI: unload other models); weights_version() changes whenever the host changes the weights in place
        # (ComfyUI: the weight patches applied) and is part of the stores' keys
        self.before_call: Callable[[], None] | None = None
        self.make_room: Callable[[int, torch.device], None] | None = None
        self.weights_version: Callable[[], object] = lambda: None
        self.prefixes = PrefixStore()   # the last request's prefilled prefixes (prefix_store.py)
        self.encodings = EncodeStore()  # recent source media's VAE posteriors and ViT embeddings (encode_store.py)
        self.paths, self.tokenizer, self.file_state = paths, tokenizer, file_state
        self.llm = llm
        self.vit_module, self.vae_module = vit.module, vae.module   # registered: .to() and state_dict see them
        self.vit, self.vae = vit, vae
        self.memory, self.plan, self.streamer = memory, plan, streamer
        # modules whose weights live in host memory and visit the device only while their stage runs
        staged = [llm, vit.module, vae.module] if memory == "offload" else []
        staged += [vit.module, vae.module] if plan is not None and plan.stages else []
        self.staged = {id(m) for m in staged}
        self.evicted: set[int] = set()   # modules sent to the CPU by a memory fallback, back when they next run
        self.device = execution_device
        llm.execution_device = execution_device
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
        """Refuse a request that cannot fit (after asking the host to make room), naming the weight plan."""
        plan = f"weights: {self.plan.describe()}" if self.plan is not None else f"memory mode {self.memory}"
        estimate.check(self.device, make_room=self.make_room, plan=plan)

    def stage_weights(self, module: nn.Module) -> int:
        """Bytes a staged module's weights add on the device while it runs, else 0."""
        if id(module) not in self.staged or on_device(module, self.device):
            return 0
        return module_bytes(module)

    def free_after_sampling(self) -> None:
        """Before a memory fallback: unreferenced tensors and cached blocks go back to the device, and a resident
        LLM that no host manages leaves the device (it comes back when it next runs)."""
        if self.before_call is None and id(self.llm) not in self.staged and self.streamer is None \
                and self.device.type != "cpu" and on_device(self.llm, self.device):
            self.llm.to("cpu")
            self.evicted.add(id(self.llm))
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_scratch(self) -> None:
        """After a failed or cancelled call: drop the VAE's frame cache, the stores and unreferenced tensors."""
        self.vae_module.clear_cache()
        self.prefixes.clear()
        self.encodings.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- stages -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, module: nn.Module, cancel: Callable[[], bool] | None = None):
        """`module` (the LLM, the ViT or the VAE) runs on the execution device, polling `cancel` inside."""
        streaming = self.streamer.active() if module is self.llm and self.streamer is not None else contextlib.nullcontext()
        with self._placed(module), streaming, cancel_hooks(self._cancel_points(module), cancel):
            yield

    @contextlib.contextmanager
    def _placed(self, module: nn.Module):
        """A staged module's weights visit the device only while it runs. Otherwise the ViT and VAE are moved
        there if a host left them elsewhere (ComfyUI's partial low-VRAM loading streams only layers built from its
        ops); the LLM is built from those ops (or streamed by the plan), so where its weights sit is not moved
        here."""
        if id(module) not in self.staged:
            if (module is not self.llm or id(module) in self.evicted) and not on_device(module, self.device):
                module.to(self.device)
            self.evicted.discard(id(module))
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

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


def task(method):
    """A public task method of an object with a `session`: one call at a time per session (the VAE's frame
    cache and the modules' device moves are shared state); the host's before_call hook runs first; a torch
    out-of-memory error becomes `OutOfMemory` after what the call held is freed."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        session: LanceSession = self.session
        with session.lock:
            outermost = session.call_depth == 0
            session.call_depth += 1
            try:
                if outermost and session.before_call is not None:
                    session.before_call()
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as exc:
                detail = first_line(exc, "out of memory")
            except BaseException:
                session.release_scratch()
                raise
            finally:
                session.call_depth -= 1
            # outside the except block: the torch error's traceback (and the tensors its frames hold) is gone
            session.release_scratch()
            raise OutOfMemory(f"{method.__name__} ran out of memory on {session.device} ({detail}); {HINT}. "
                              "The model is still loaded and usable.")
    return run


def on_device(module: nn.Module, device: torch.device) -> bool:
    """True when all of the module's weights are on `device` ("cuda" without an index = the current GPU)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else None)
    return all(p.device.type == device.type and p.device.index == index for p in module.parameters())


def fingerprint(paths: ReleasePaths) -> str:
    stat = paths.llm_weights.stat()
    digest = hashlib.sha1(f"{paths.llm_weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{paths.lance_dir.name}@{digest}"
