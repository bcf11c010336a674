"""The one place that knows about ComfyUI version differences.

Supported hosts: ComfyUI 0.3.64 (the test host in ../shared/comfyui) and current upstream. The all-in-one nodes
reach ComfyUI only through this module, so a future API change is fixed here; the native path's modules
(native_model.py, native_sampling.py) subclass and register core classes by nature, and import them directly.

Differences handled (checked against 0.3.64's comfy_api/latest and upstream master):
- `io.Schema` grew fields after 0.3.64 (search_aliases, essentials_category, is_dev_only, accept_all_inputs,
  has_intermediate_output, price_badge): `schema()` drops keywords the running version does not know.
- `io.Video` / `InputImpl.VideoFromComponents` / `Types.VideoComponents` exist in both, but older hosts lacked
  them: `HAS_VIDEO` gates the VIDEO outputs (the IMAGE output always carries the frames).
- upstream re-exports io/ui through `_io_public`/`_ui_public`; importing `comfy_api.latest` works in both.
- `ComfyExtension.on_load()` is never called by 0.3.64: setup runs at import / in `comfy_entrypoint()`.
- `PromptServer.send_progress_text` (text streamed to a node) may be missing on old/embedded hosts: optional.
- Dynamic VRAM (0.33.0, comfy-aimdo; on by default on GPUs): core builds patchers as `CoreModelPatcher`, which
  main.py rebinds to ModelPatcherDynamic, and registers `cached_patcher_init` reload factories. 0.3.64 has
  neither: `model_patcher()` falls back to ModelPatcher and skips the factory. `weight_device()` says where the
  weights go (RAM when they are streamed).
- Partial (low-VRAM) loads of our one patcher differ for the ViT and VAE, plain torch layers (the LLM is built
  from comfy.ops.manual_cast and is cast per use when it does not fit). 0.3.64's ModelPatcher loads whole layers,
  largest first, while they fit the budget and leaves a plain layer that does not fit where it is (in RAM); under
  pressure `partially_unload` sends loaded layers back to RAM, smallest first (the ViT's and VAE's among the
  first), and a full unload moves the whole model. 0.33.0's ModelPatcher does the same; its ModelPatcherDynamic
  moves every plain weight to the GPU when it loads (keeping the RAM tensor as a backup) and puts the backups back
  when it frees memory. Either way the library brings what is left in RAM for its stage only and sends it back
  after, so core's account of what it loaded stays true (lance_model/runtime/session.py).
- Models are never unloaded by hand: the pack drops its references and core's own bookkeeping (weak references
  in `current_loaded_models`, `free_memory` under pressure) does the rest, as for core's own loaders.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from fractions import Fraction

import torch

from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401  (re-exported for the node modules)

try:  # present in 0.3.64 and upstream
    from comfy_api.latest import InputImpl, Types
except ImportError:  # pragma: no cover - very old hosts
    InputImpl = Types = None

import comfy.model_management as mm
import comfy.utils
import folder_paths

log = logging.getLogger("lance_nodes")

MODEL_FOLDER = "lance"

HAS_VIDEO = (hasattr(io, "Video") and InputImpl is not None and hasattr(InputImpl, "VideoFromComponents")
             and Types is not None and hasattr(Types, "VideoComponents"))

_SCHEMA_FIELDS = set(inspect.signature(io.Schema).parameters)


def schema(**kwargs) -> io.Schema:
    """io.Schema without the keywords this ComfyUI version does not know."""
    return io.Schema(**{k: v for k, v in kwargs.items() if k in _SCHEMA_FIELDS})


def video_outputs(display_name: str = "video") -> list:
    """[io.Video.Output] where the host has VIDEO, else [] (the IMAGE output carries the frames)."""
    if not HAS_VIDEO:
        return []
    return [io.Video.Output(display_name=display_name, tooltip="The first sample as a VIDEO (for SaveVideo).")]


def make_video(frames: torch.Tensor, fps: float):
    """VIDEO from IMAGE frames [T,H,W,3] (0..1, CPU)."""
    components = Types.VideoComponents(images=frames, audio=None, frame_rate=Fraction(fps).limit_denominator(1000))
    return InputImpl.VideoFromComponents(components)


# ---------------------------------------------------------------- model folder
def register_model_folder() -> None:
    """models/lance (+ any `lance:` entry of extra_model_paths.yaml, which ComfyUI adds itself)."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    known = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    if known is None or default not in known[0]:
        folder_paths.add_model_folder_path(MODEL_FOLDER, default)


def model_roots() -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(MODEL_FOLDER))
    except KeyError:
        return []


def list_model_entries() -> list[str]:
    """Names of the entries of every `lance` model folder. Release folders are what belongs there; files are
    listed too so that a misplaced file gets a clear error on the node instead of silently vanishing."""
    names = set()
    for root in model_roots():
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if name.startswith(".") or name.startswith("put_") or name.endswith(".txt"):
                continue
            names.add(name)
    return sorted(names)


def model_path(name: str) -> str | None:
    for root in model_roots():
        path = os.path.join(root, name)
        if os.path.lexists(path):
            return path
    return None


# ---------------------------------------------------------------- devices and memory
def load_device() -> torch.device:
    return mm.get_torch_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def manual_cast_ops():
    """ComfyUI's cast-on-the-fly ops (low-VRAM partial loading reaches only layers built from these)."""
    import comfy.ops
    return comfy.ops.manual_cast


def _patcher_class(disable_dynamic: bool = False):
    """Core's patcher class, looked up at call time: main.py rebinds `CoreModelPatcher` to ModelPatcherDynamic
    after import when Dynamic VRAM is on. 0.3.64 has only ModelPatcher."""
    import comfy.model_patcher as core
    if disable_dynamic:
        return core.ModelPatcher
    return getattr(core, "CoreModelPatcher", core.ModelPatcher)


def model_patcher(module: torch.nn.Module, size: int = 0, reload=None, disable_dynamic: bool = False):
    """ComfyUI's patcher for `module`, as core loaders build theirs: `CoreModelPatcher` where the host has it
    (ModelPatcherDynamic under Dynamic VRAM; it falls back to ModelPatcher itself for a CPU load device), else
    ModelPatcher.

    `reload` is a zero-argument callable that builds the same module again from disk. It is registered as the
    patcher's `cached_patcher_init` factory (hosts that have it): core calls it when it needs a private copy of
    the weights, e.g. a non-dynamic delegate (`clone(disable_dynamic=True)`) or a copy for another GPU. Without
    it those core features raise for this model; nothing else changes.

    Under Dynamic VRAM the patcher streams the weights of layers built from comfy.ops (the LLM) from RAM at
    run time and moves every other weight and buffer to the load device when it loads: build `module` on
    `weight_device()`, in its compute dtype (core casts a streamed weight to `<name>_comfy_model_dtype` when set,
    else keeps the stored dtype). A module whose weights already sit on the GPU gets the classic ModelPatcher:
    the dynamic one could never move them off the GPU to free memory."""
    disable_dynamic = disable_dynamic or _on_gpu(module)
    patcher = _patcher_class(disable_dynamic)(module, load_device=load_device(), offload_device=offload_device(),
                                              size=size)
    if reload is not None and hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (_reloaded_patcher, (reload, size))
    return patcher


def _on_gpu(module: torch.nn.Module) -> bool:
    return any(not mm.is_device_cpu(param.device) for param in module.parameters())


def _reloaded_patcher(reload, size, disable_dynamic: bool = False):
    """The `cached_patcher_init` factory: core calls factory(*args) or factory(*args, disable_dynamic=True)."""
    return model_patcher(reload(), size, reload, disable_dynamic=disable_dynamic)


def dynamic_vram() -> bool:
    """True when the patcher model_patcher() builds streams weights (Dynamic VRAM via comfy-aimdo on a GPU)."""
    try:
        import comfy.memory_management as memory
    except ImportError:  # 0.3.64: no Dynamic VRAM
        return False
    import comfy.model_patcher as core
    dynamic = getattr(core, "ModelPatcherDynamic", None)
    if dynamic is None or not getattr(memory, "aimdo_enabled", False) or mm.is_device_cpu(load_device()):
        return False
    return issubclass(_patcher_class(), dynamic)


def weight_device() -> torch.device:
    """Where a resident model's weights should be built: RAM under Dynamic VRAM (the patcher streams them to the
    GPU), the load device otherwise (as core's unet_inital_load_device does for its own models)."""
    return offload_device() if dynamic_vram() else load_device()


def applied_patches(patcher) -> object:
    """Which weight patches core has applied to the patcher's model right now (core sets the patching
    patcher's uuid on the model, None when unpatched): changes whenever a LoRA clone patches the shared weights."""
    return getattr(getattr(patcher, "model", None), "current_weight_patches_uuid", None)


def load_to_device(patcher, full: bool) -> None:
    mm.load_models_gpu([patcher], force_full_load=full)


def reclaimable_bytes(device: torch.device) -> int:
    """Device bytes core can free on `device` by unloading the models it holds there."""
    return sum(entry.model_loaded_memory() for entry in mm.current_loaded_models
               if entry.device == device and entry.model is not None)


def free_memory(num_bytes: int, device: torch.device, keep=None) -> None:
    """Ask core to move other models off `device` until `num_bytes` are free (keeping `keep`, a patcher)."""
    mm.free_memory(num_bytes, device, keep_loaded=[mm.LoadedModel(keep)] if keep is not None else [])


def output_directory() -> str:
    return folder_paths.get_output_directory()


def temp_directory() -> str:
    return folder_paths.get_temp_directory()


def save_latent(samples: torch.Tensor, root: str, prefix: str, keep: int) -> str:
    """Save a LATENT's samples in core's SaveLatent format under `root` (the output or temp folder) as
    <prefix>_NNNNN_.latent, then delete the older files of that name beyond the newest `keep`; returns the path.
    A failed write leaves no partial file."""
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, root)
    path = os.path.join(folder, f"{name}_{counter:05}_.latent")
    try:
        comfy.utils.save_torch_file({"latent_tensor": samples.contiguous(),
                                     "latent_format_version_0": torch.tensor([])}, path)
    except BaseException:
        _remove(path)
        raise
    _keep_newest(folder, name, keep)
    return path


def _keep_newest(folder: str, name: str, keep: int) -> None:
    """Delete the files <name>_NNNNN_.latent of `folder` but the `keep` highest-numbered (the newest)."""
    numbered = re.compile(rf"{re.escape(name)}_(\d{{5,}})_\.latent")
    try:
        entries = os.listdir(folder)
    except OSError as exc:
        log.warning("could not list %s to delete older %s files: %s", folder, name, exc)
        return
    saved = sorted((int(match.group(1)), entry) for entry in entries if (match := numbered.fullmatch(entry)))
    for _, entry in saved[:-keep]:
        _remove(os.path.join(folder, entry))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:   # a file that cannot go now is no reason to fail the caller
        log.warning("could not remove %s: %s", path, exc)


# ---------------------------------------------------------------- interrupt, progress, previews
def interrupted() -> bool:
    return bool(mm.processing_interrupted())


def raise_interrupt() -> None:
    """Raise ComfyUI's interrupt exception (and clear the flag, as ComfyUI's own samplers do)."""
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


def wan22_previewer():
    """Latent -> RGB previewer for the Wan2.2 48-channel latent (None when previews are off: --preview-method none)."""
    try:
        import comfy.latent_formats
        import latent_preview
        return latent_preview.get_previewer(load_device(), comfy.latent_formats.Wan22())
    except Exception as exc:  # noqa: BLE001 - previews are cosmetic
        log.debug("no latent previewer: %s", exc)
        return None


def preview_image(previewer, x0: torch.Tensor):
    if previewer is None:
        return None
    return previewer.decode_latent_to_preview_image("JPEG", x0.detach().float())


def send_text(node_id, text: str) -> None:
    """Stream text to a node's UI (ComfyUI shows it on the node while it runs)."""
    if node_id is None:
        return
    try:
        from server import PromptServer
        server = getattr(PromptServer, "instance", None)
        sender = getattr(server, "send_progress_text", None)
        if sender is not None:
            sender(text, str(node_id))
    except Exception as exc:  # noqa: BLE001 - streaming is cosmetic
        log.debug("send_progress_text failed: %s", exc)
