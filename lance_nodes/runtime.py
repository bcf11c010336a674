"""The loaded-model cache, input checks and progress/preview/interrupt plumbing shared by the nodes.

No model math here: every computation is a call into `lance_model`.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass, replace

import torch

from . import compat, errors
from .errors import FP8_MEMORY_MODES, CheckpointError, input_error
from .library import lance_model
from .native_model import make_patcher  # one patcher for the all-in-one nodes and the core MODEL output
from .placed_patcher import placed_patcher

log = logging.getLogger("lance_nodes")

LATENT_CHANNELS = 48           # Wan2.2 VAE latent channels (ComfyUI's Wan22 latent format)
KEPT_UNDECODED = 4             # latents of decodes that ran out of memory: files kept per folder (the oldest go)


@dataclass
class LoadedLance:
    """The value carried by LANCE_MODEL sockets: one loaded Lance release (the library's pipeline and the one
    ComfyUI patcher over its weights), shared by all nodes and queue runs."""

    name: str
    path: str
    variant: str
    dtype: str
    attention: str
    memory_mode: str
    pipe: lance_model.LancePipeline
    patcher: object = None
    weight_dtype: str = "default"

    @property
    def model_id(self) -> str:
        return self.pipe.model_id

    def __repr__(self) -> str:  # shown by PreviewAny and in errors
        weights = "" if self.weight_dtype == "default" else f", weight_dtype={self.weight_dtype}"
        return (f"LoadedLance({self.name!r}, variant={self.pipe.variant}, "
                f"dtype={self.pipe.dtype}, memory={self.memory_mode}{weights})")


# Every model some graph still holds (ComfyUI's output cache keeps a loader's result alive), so two loaders with
# different options share nothing and coexist; ComfyUI's memory manager decides what to move off the GPU. The
# model used last stays referenced here too, so it survives prompts without Lance nodes.
_LIVE: "weakref.WeakValueDictionary[tuple, LoadedLance]" = weakref.WeakValueDictionary()
_LAST_USED: list[LoadedLance] = []
_CACHE_LOCK = threading.Lock()

# the loader's memory_mode (new options are appended: saved workflows keep their values). resident: the weights
# are built on the GPU and ComfyUI's classic patcher manages them (partial loads on small cards); dynamic: built in
# RAM for ComfyUI's Dynamic VRAM (CoreModelPatcher streams them; elsewhere it loads them to the GPU as memory
# allows); offload: the library moves each stage to the GPU only while it runs; auto: the library's VRAM plan, the
# fastest bit-exact placement that fits the card (lance_model/runtime/vram_plan.py); stream: both LLM experts streamed from
# RAM layer by layer, ViT and VAE visiting while they run
LOADER_MEMORY_MODES = ("resident", "offload", "dynamic", "auto", "stream")
LIBRARY_PLACED = ("offload", "auto", "stream")   # the library places the weights itself (placed_patcher.py)
# the loader's weight_dtype, as core's UNETLoader names it -> the experts stored in fp8 (only where the library
# places the weights: auto, stream)
WEIGHT_DTYPES = {"default": (), "fp8_e4m3fn": ("und",), "fp8_e4m3fn (both experts)": ("und", "gen")}
DOWNLOAD_HINT = ("Download the release with `hf download bytedance-research/Lance --local-dir "
                 "ComfyUI/models/lance/Lance-3B` (Lance_3B/, Lance_3B_Video/, Qwen2.5-VL-ViT/, Wan2.2_VAE.pth) "
                 "and refresh.")


def resolve_model_path(name: str) -> str:
    """The release folder for a model_name: only an entry of a registered `lance` folder (no paths, no
    '..'); symlinks inside those folders are the user's choice."""
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
        raise CheckpointError(
            f"model_name: expected the name of a folder inside models/lance (one of {compat.list_model_entries()}), "
            f"got {name!r}. Paths are not accepted. {DOWNLOAD_HINT}")
    path = compat.model_path(name)
    if path is None:
        raise CheckpointError(
            f"model_name: Lance model folder {name!r} not found in the 'lance' model folder(s) "
            f"{compat.model_roots()}. {DOWNLOAD_HINT}")
    if not os.path.isdir(path):
        raise CheckpointError(
            f"model_name: {name!r} is a file, not a folder. Each entry of models/lance must be a Lance release "
            f"folder containing Lance_3B (or Lance_3B_Video), Qwen2.5-VL-ViT and Wan2.2_VAE.pth.")
    return os.path.realpath(path)


def get_model(name: str, variant: str = "auto", dtype: str = "auto", attention: str = "auto",
              memory_mode: str = "resident", weight_dtype: str = "default") -> LoadedLance:
    """Load (once) and return the shared model for these options. A model whose files changed on disk since it
    was loaded is loaded again; a failed load leaves every cached model as it was."""
    if memory_mode not in LOADER_MEMORY_MODES:
        raise input_error(f"memory_mode must be one of {LOADER_MEMORY_MODES}, got {memory_mode!r}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise input_error(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if WEIGHT_DTYPES[weight_dtype] and memory_mode not in FP8_MEMORY_MODES:
        raise input_error(f"weight_dtype {weight_dtype!r} needs memory_mode 'auto' or 'stream' (where Lance places "
                          f"its weights itself); with {memory_mode!r} ComfyUI manages them, and its weight patches "
                          f"(LoRA) do not know Lance's fp8 scales")
    path = resolve_model_path(name)
    key = (path, variant, dtype, attention, memory_mode, weight_dtype)
    with _CACHE_LOCK:
        model = _LIVE.get(key)
        if model is not None:
            changed = model.pipe.changed_files()
            if not changed:
                _remember(model)
                return model
            log.warning("Lance: %s changed on disk since %r was loaded: loading it again", ", ".join(changed), name)
        model = _load(name, path, variant, dtype, attention, memory_mode, weight_dtype)
        _LIVE[key] = model
        _remember(model)
        log.info("Lance: loaded %s", model)
        return model


def _load(name, path, variant, dtype, attention, memory_mode, weight_dtype) -> LoadedLance:
    # The library runs on ComfyUI's torch device. resident/dynamic: layers come from comfy.ops.manual_cast, so when
    # ComfyUI frees memory and later reloads the model partially (low VRAM), the rest stays usable; ComfyUI's one
    # patcher manages the weights. offload/auto/stream: the library places them itself (stage by stage, or by its
    # VRAM plan), with plain torch layers (fp8 storage replaces them); core sees their device bytes through a
    # patcher that places or offloads the plan whole when core loads or unloads it, and never moves them itself.
    places_itself = memory_mode in LIBRARY_PLACED
    weights = compat.weight_device() if memory_mode == "dynamic" else None

    def build():
        device = compat.load_device()
        return lance_model.load_lance(path, variant=variant, dtype=dtype, device=str(device), attention=attention,
                                      operations=None if places_itself else compat.manual_cast_ops(),
                                      memory=memory_mode if places_itself else "resident", weights_device=weights,
                                      fp8=WEIGHT_DTYPES[weight_dtype],
                                      vram_budget=plan_budget(device) if memory_mode == "auto" else None,
                                      # core makes room for them when the first Lance node runs
                                      defer_placement=places_itself)

    pipe = build()
    if pipe.plan is not None:
        log.info("Lance weight plan (memory_mode %s): %s", memory_mode, pipe.plan.describe())
    # core rebuilds a private copy through `build` when it needs one (another GPU, a non-dynamic clone)
    patcher = placed_patcher(pipe.session, compat.load_device(), torch.device("cpu")) if places_itself \
        else make_patcher(pipe, reload=build)
    connect_host(pipe.session, patcher)
    return LoadedLance(name=name, path=path, variant=variant, dtype=dtype, attention=attention,
                       memory_mode=memory_mode, pipe=pipe, patcher=patcher, weight_dtype=weight_dtype)


def plan_budget(device) -> int | None:
    """The budget of memory_mode auto's plan: what the device can give now plus what core can free by unloading
    the other models it holds there (it does when Lance first runs), so that the plan does not depend on which
    models an earlier prompt left loaded. None off CUDA (no plan needed)."""
    budget = lance_model.runtime.vram_plan.device_budget(device)
    return None if budget is None else budget + compat.reclaimable_bytes(device)


def plan_text(model: LoadedLance) -> str:
    """What the Loader shows on its node: where the weights are."""
    if model.pipe.plan is not None:
        return f"memory_mode {model.memory_mode}: {model.pipe.plan.describe()}"
    where = {"resident": "ComfyUI manages the weights (partial loads on small cards)",
             "dynamic": "ComfyUI's Dynamic VRAM streams the weights",
             "offload": "each stage (ViT, LLM, VAE) visits the GPU only while it runs"}
    return f"memory_mode {model.memory_mode}: {where[model.memory_mode]}"


def connect_host(session, patcher) -> None:
    """The session's host hooks. A weak reference to the patcher, so that session -> hook -> patcher -> session is
    no cycle (a dropped model's weights are freed at once, not at the next gc)."""
    keep = weakref.ref(patcher)
    whole = lance_model.runtime.session.SCOPE_ALL

    def before_call(scope: str) -> None:
        # a call that may run any module first puts the weights back on the device if ComfyUI offloaded them under
        # memory pressure (after a partial low-VRAM load core streams the LLM's layers; the library brings ViT and
        # VAE weights left in RAM for their stage only). A VAE-only call loads nothing: as with core's own VAE,
        # only the VAE visits the device
        if scope == whole and keep() is not None:
            compat.load_to_device(keep(), full=False)

    def make_room(num_bytes: int, device, scope: str) -> None:
        # before a request that does not fit is refused, core may free other models' memory, and this one's too
        # when only its VAE runs (a decode is not refused for the sake of an LLM it does not use)
        compat.free_memory(num_bytes, device, keep=keep() if scope == whole else None)

    session.before_call = before_call
    session.make_room = make_room
    # prefixes and encodings kept across runs must not outlive a LoRA clone patching the shared weights in place
    session.weights_version = lambda: compat.applied_patches(keep())


def _remember(model: LoadedLance) -> None:
    _LAST_USED[:] = [model]


def model_files_fingerprint(name: str, variant: str = "auto") -> str:
    """The release files' size, mtime and inode (the library's own snapshot, the one `changed_files()` compares):
    LanceLoader's fingerprint, so that ComfyUI runs the loader again (and it reloads) when a file is replaced,
    even when the loader's output is cached."""
    try:
        paths = lance_model.nn.checkpoint.resolve_release(resolve_model_path(name), variant)
    except (CheckpointError, lance_model.CheckpointError):
        return "missing"
    return repr(sorted(paths.snapshot().items()))


# ---------------------------------------------------------------- input checks (clear errors on the node)
def check_model(model) -> LoadedLance:
    if not isinstance(model, LoadedLance):
        raise input_error(f"model: expected a LANCE_MODEL from the Lance Loader node, got {type(model).__name__}")
    return model


def check_context(context, model: LoadedLance, what: str = "context"):
    """None, or a LanceContext made by this same model."""
    if context is None:
        return None
    if not isinstance(context, lance_model.LanceContext):
        raise input_error(f"{what}: expected a LANCE_CONTEXT from a Lance node, got {type(context).__name__}")
    context_id = context.model_id
    if context_id != model.model_id:
        raise input_error(
            f"{what}: this conversation context was made by another Lance model ({context_id}), but this node "
            f"runs {model.name!r} ({model.model_id}). Connect a context produced with the same Lance Loader "
            f"settings, or leave '{what}' unconnected to start a new conversation.")
    return context


def check_finite(**values) -> None:
    """Float widgets: ComfyUI's min/max validation lets NaN through (every comparison with NaN is false)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise input_error(f"{name}: expected a finite number, got {value!r}")


def _check_finite_tensor(tensor: torch.Tensor, what: str, kind: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise input_error(f"{what}: the {kind} contains NaN or Inf values; expected finite numbers (check the "
                          f"node that produced it)")


def _check_pixels(frames: torch.Tensor, what: str, kind: str) -> torch.Tensor:
    """What every IMAGE input needs once its layout is right: a frame size Lance accepts, finite values in 0..1."""
    lance_model.io.media.check_frame_size(frames.shape[1], frames.shape[2], what)
    _check_finite_tensor(frames, what, kind)
    lance_model.io.validation.require_unit_range(frames, what)
    return frames[..., :3]


def _is_image_batch(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-1] in (3, 4)


def _layout(value) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_image(image, what: str = "image") -> torch.Tensor:
    """A single image: IMAGE [1,H,W,3]."""
    if not _is_image_batch(image):
        raise input_error(f"{what}: expected an IMAGE [batch, height, width, 3], got {_layout(image)}")
    if image.shape[0] != 1:
        raise input_error(
            f"{what}: got an IMAGE batch of {image.shape[0]} images, but this input takes one image. "
            f"Pick one (e.g. core 'ImageFromBatch'), or use a video input (Lance Video Edit / Understand 'video') "
            f"if the batch is a video's frames.")
    return _check_pixels(image, what, "IMAGE")


def check_video(frames, what: str = "video") -> torch.Tensor:
    """A video as an IMAGE batch of frames [T,H,W,3], T >= 2."""
    if not _is_image_batch(frames):
        raise input_error(f"{what}: expected video frames as an IMAGE batch [frames, height, width, 3], got "
                          f"{_layout(frames)}")
    if frames.shape[0] < 2:
        raise input_error(
            f"{what}: got {frames.shape[0]} frame(s), but a video is needed (at least 2 frames, "
            f"typically 4k+1 such as 5, 17, 33 or 61). Load a video (core 'Load Video' -> 'Get Video Components'), "
            f"or use the image input / Lance Edit for a single image.")
    return _check_pixels(frames, what, "video")


def check_images(images, what: str) -> torch.Tensor:
    """One image or a video's frames, as an IMAGE batch [T,H,W,3] (VAE Encode takes either)."""
    if not _is_image_batch(images):
        raise input_error(f"{what}: expected an IMAGE [batch, height, width, 3] (one image or a video's frames), "
                          f"got {_layout(images)}")
    return _check_pixels(images, what, "IMAGE")


def check_latent(latent, what: str = "samples") -> torch.Tensor:
    if not isinstance(latent, dict):
        raise input_error(f"{what}: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    samples = latent.get("samples")
    if not isinstance(samples, torch.Tensor):
        raise input_error(f"{what}: the LATENT's 'samples' must be a tensor [B, {LATENT_CHANNELS}, t, h, w], got "
                          f"{type(samples).__name__}")
    if samples.ndim == 4:
        samples = samples.unsqueeze(2)
    if samples.ndim != 5 or samples.shape[1] != LATENT_CHANNELS:
        raise input_error(
            f"{what}: LATENT has shape {tuple(samples.shape)} ({samples.shape[1] if samples.ndim > 1 else '?'} "
            f"channels); Lance uses the Wan2.2 latent with {LATENT_CHANNELS} channels [B,48,t,h,w]. "
            f"This LATENT comes from another model family (e.g. SD/SDXL/Flux latents have 4 or 16 channels).")
    _check_finite_tensor(samples, what, "LATENT")
    return samples


# ---------------------------------------------------------------- running with progress / previews / interrupt
class _Progress:
    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.bar = compat.progress_bar(self.total)
        self.previewer = compat.wan22_previewer()
        self.done = 0

    def on_step(self, step: int, total: int, x0=None) -> None:
        # one call per finished step (whether the library counts from 0 or 1 does not matter here)
        total = int(total) if total else self.total
        self.done = min(self.done + 1, total)
        preview = compat.preview_image(self.previewer, x0) if x0 is not None else None
        self.bar.update_absolute(self.done, total, preview)


def generate(model: LoadedLance, task, *args, settings, to_fit: str, **kwargs):
    """Run one generation task method of the model's pipeline (e.g. `model.pipe.text_to_image`) with `settings`
    wired to the progress bar + latent previews and to ComfyUI's interrupt. Out of memory, the error names the
    remedies of the node (`to_fit`: its inputs that shrink the request) and the Loader; when sampling finished
    but decoding ran out of memory, the sampled LATENT is kept in a file and the error says where."""
    settings = replace(settings, on_step=_Progress(settings.steps).on_step, cancel=compat.interrupted)
    try:
        return _interruptible(task, *args, settings=settings, **kwargs)
    except lance_model.DecodeOutOfMemory as exc:
        kept = keep_undecoded(latent_output(exc.result)["samples"])
        raise errors.out_of_memory(exc, model, LOADER_MEMORY_MODES, to_fit, runs_llm=False, kept=kept) from exc
    except lance_model.OutOfMemory as exc:
        raise errors.out_of_memory(exc, model, LOADER_MEMORY_MODES, to_fit) from exc


def call(model: LoadedLance, task, *args, to_fit: str = "", runs_llm: bool = True, **kwargs):
    """Run one other library call (understanding, decoding) with `cancel` = ComfyUI's interrupt check; out of
    memory, the error names the node's remedies (`to_fit`; fp8 weights where the call `runs_llm`)."""
    try:
        return _interruptible(task, *args, cancel=compat.interrupted, **kwargs)
    except lance_model.OutOfMemory as exc:
        raise errors.out_of_memory(exc, model, LOADER_MEMORY_MODES, to_fit, runs_llm=runs_llm) from exc


def decode(model: LoadedLance, samples: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """A checked LATENT's samples -> frames [B, T, H, W, 3] (Lance Decode, core VAE Decode on Lance's VAE)."""
    batch = samples.shape[0]
    to_fit = f"decode the {batch} samples one at a time (core Latent From Batch)" if batch > 1 else ""
    return call(model, model.pipe.decode_raw_latents, samples, what="samples", tiled=tiled, to_fit=to_fit,
                runs_llm=False)


def encode(model: LoadedLance, frames: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Checked IMAGE frames -> LATENT samples (core VAE Encode on Lance's VAE)."""
    what = "image" if frames.shape[0] == 1 else "frames"
    return call(model, model.pipe.encode_raw_latents, frames, what="pixels", tiled=tiled,
                to_fit=f"encode a smaller {what} (scale it down first, e.g. with core Upscale Image By)",
                runs_llm=False)


def keep_undecoded(samples: torch.Tensor) -> str:
    """Save a LATENT whose decode ran out of memory (core's SaveLatent format) to output/lance, or where that
    fails to ComfyUI's temp folder; returns the sentence telling the artist where it is, or why it is lost.
    Never raises: the out-of-memory error it goes into must reach the artist."""
    use = ("copy it into ComfyUI's input folder, load it with Load Latent and decode it in a prompt of its own with "
           f"Lance Decode Latent or VAE Decode (Tiled) (the last {KEPT_UNDECODED} of these files are kept)")
    try:
        path = compat.save_latent(samples, compat.output_directory(), "lance/undecoded", keep=KEPT_UNDECODED)
        return f"The sampled LATENT is saved to {path}: {use}."
    except Exception as exc:  # noqa: BLE001 - a full disk, a file in the folder's place...: try the temp folder
        output_failed = _reason(exc)
    try:
        path = compat.save_latent(samples, compat.temp_directory(), "lance/undecoded", keep=KEPT_UNDECODED)
        return (f"The sampled LATENT could not be saved in the output folder ({output_failed}), so it is saved to "
                f"{path}, in ComfyUI's temp folder, which ComfyUI empties when it starts or stops: {use}.")
    except Exception as exc:  # noqa: BLE001 - say why; the out-of-memory error still goes out
        return (f"The sampled LATENT could not be kept: saving it failed in the output folder ({output_failed}) "
                f"and in ComfyUI's temp folder ({_reason(exc)}).")


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _interruptible(task, *args, **kwargs):
    """A library Cancelled becomes ComfyUI's InterruptProcessingException; the model stays usable."""
    if compat.interrupted():
        compat.raise_interrupt()
    try:
        return task(*args, **kwargs)
    except lance_model.Cancelled:
        compat.raise_interrupt()


def describe_context(context) -> str:
    """A readable transcript of a LanceContext (LanceContext.summary()), for LanceContextView."""
    if context is None:
        return "(no context)"
    if not isinstance(context, lance_model.LanceContext):
        raise input_error(f"context: expected a LANCE_CONTEXT from a Lance node, got {type(context).__name__}")
    return context.summary()


def frames_to_image(frames: torch.Tensor) -> torch.Tensor:
    """GenerationResult.frames [B,T,H,W,3] -> ComfyUI IMAGE batch [B*T,H,W,3] (float32, CPU)."""
    frames = frames.detach().to("cpu", torch.float32)
    if frames.ndim == 5:
        frames = frames.reshape(-1, *frames.shape[2:])
    return frames.clamp(0, 1).contiguous()


def latent_output(result) -> dict:
    samples = result.comfy_latent().detach().to("cpu", torch.float32)
    return {"samples": samples}
