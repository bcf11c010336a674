"""The task API: one loaded Lance (LLM + ViT + VAE + tokenizer) and a method per task.

Every generation task is two steps, both public: `prepare_*` turns the request into `GenerationInputs` (packed
sequence, ViT embeddings, clean condition latents), and `generate` samples and decodes. Latents are returned
normalized (model space) and un-normalized (`comfy_latent()`, the layout ComfyUI's Wan2.2 VAE decodes).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .attention import Attention
from .checkpoint import ReleasePaths, resolve_release
from .context import LanceContext, Turn
from .devices import resolve_device, resolve_dtype
from .errors import Cancelled, InputError, OutOfMemory
from .interrupt import cancel_hooks
from .memory import HINT, Estimate, kv_cache_bytes, forward_activation_bytes, module_bytes, vae_decode_bytes, vae_encode_bytes
from .validation import (batch_seeds, require_bool, require_callable, require_choice, require_finite_tensor,
                         require_float, require_int, require_seed)
from .generation import (GenerationInputs, LatentGrid, edit_sequence, initial_noise, run_generation,
                         text_to_visual_sequence, tokens_to_video, video_to_tokens)
from .inputs import as_frames, latent_frames, optional_text, require_text, round_size, unit_frames
from .loader import check_llm_files, load_llm
from .media import preset_sides, vae_pixels, vit_pixels
from .ops import TorchOps
from .encode_store import EncodeStore
from .prefix_store import PrefixStore
from .sampler import RENORM_TYPES, UNCOND_POSITIONS, GuidanceOptions, SamplerOptions, StepInfo, flow_timesteps
from .templates import IMAGE_QUESTION_SYSTEM, VIDEO_QUESTION_SYSTEM, Text
from .tokenizer import LanceTokenizer
from .understanding import SamplingOptions, decode, prompt_embeddings, understanding_sequence
from .vae import LanceVAE, load_vae
from .vit import LanceViT, check_vit_files, load_vit

log = logging.getLogger(__name__)
MEMORY_MODES = ("resident", "offload")
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_NEW_TOKENS = 16384   # the KV cache is preallocated for prompt + max_new_tokens
ENHANCE_INSTRUCTION = (
    "You write prompts for a text-to-{kind} model. Rewrite the user's short prompt into one detailed paragraph: "
    "the main subject, its appearance, colors, materials, the setting and background, lighting, composition{motion}. "
    "Keep every detail the user gave and invent nothing that contradicts it. Answer with the rewritten prompt only."
)


@dataclass
class GenerationSettings:
    steps: int = 30
    shift: float = 3.5
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: str = "global"
    cfg_renorm_min: float = 0.0
    seed: int = 42
    batch_size: int = 1
    batched_cfg: bool | None = None    # None = auto (batched for images and short clips, see sampler.py)
    uncond_positions: str = "reference_kv"
    condition_sampling: str = "mean"    # "mean" (deterministic) or "reference" (the official posterior sample)
    euler_state: str = "fp32"           # dtype of the latents between Euler steps; the official code keeps "bf16"
    include_history: bool = False       # put the context's earlier turns into the prompt as text
    decode: bool = True
    on_step: Callable[[int, int, torch.Tensor], None] | None = None   # (step, total, x0 [B, C, t, h, w])
    cancel: Callable[[], bool] | None = None
    context: LanceContext | None = None
    negative_prompt: str = ""          # the uncond branch's text in the caption's place ("" = the official dropped caption)
    image_cfg_scale: float = 1.0       # edits: image CFG (1 = off, the official behaviour; see sampler.py)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Type and range of every option (InputError naming it). Seeds are 0..2^64-1; a batch uses seed, seed+1,
        ... wrapping modulo 2^64."""
        require_int(self.steps, "steps", 1, MAX_STEPS)
        require_float(self.shift, "shift", above=0.0, maximum=1000.0)
        require_float(self.cfg_scale, "cfg_scale", minimum=1.0, maximum=1000.0)
        if not isinstance(self.cfg_interval, (tuple, list)) or len(self.cfg_interval) != 2:
            raise InputError(f"cfg_interval must be a pair (low, high) of numbers in 0..1, got {self.cfg_interval!r}")
        low = require_float(self.cfg_interval[0], "cfg_interval[0]", 0.0, 1.0)
        high = require_float(self.cfg_interval[1], "cfg_interval[1]", 0.0, 1.0)
        if low > high:
            raise InputError(f"cfg_interval must satisfy low <= high, got {tuple(self.cfg_interval)}")
        require_choice(self.cfg_renorm, "cfg_renorm", RENORM_TYPES)
        require_float(self.cfg_renorm_min, "cfg_renorm_min", 0.0, 1.0)
        require_float(self.image_cfg_scale, "image_cfg_scale", 0.0, 1000.0)
        require_seed(self.seed, "seed")
        require_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        if self.batched_cfg is not None:
            require_bool(self.batched_cfg, "batched_cfg")
        require_choice(self.uncond_positions, "uncond_positions", UNCOND_POSITIONS)
        require_choice(self.condition_sampling, "condition_sampling", ("mean", "reference"))
        require_choice(self.euler_state, "euler_state", ("fp32", "bf16"))
        require_bool(self.include_history, "include_history")
        require_bool(self.decode, "decode")
        require_callable(self.on_step, "on_step")
        require_callable(self.cancel, "cancel")
        _check_context(self.context)

    def sampler_options(self) -> SamplerOptions:
        guidance = GuidanceOptions(float(self.cfg_scale), tuple(self.cfg_interval), self.cfg_renorm,
                                   float(self.cfg_renorm_min), self.uncond_positions, float(self.image_cfg_scale))
        state = torch.float32 if self.euler_state == "fp32" else torch.bfloat16
        return SamplerOptions(int(self.steps), float(self.shift), guidance, self.batched_cfg, state)


@dataclass
class GenerationResult:
    latents: torch.Tensor          # [B, C, t, h, w] normalized (model space), fp32, CPU
    raw_latents: torch.Tensor      # [B, C, t, h, w] un-normalized Wan2.2 latents (ComfyUI LATENT "samples")
    frames: torch.Tensor | None    # [B, T, H, W, 3] float in 0..1, CPU
    context: LanceContext

    def comfy_latent(self) -> torch.Tensor:
        return self.raw_latents


@dataclass
class UnderstandingResult:
    text: str
    token_ids: list[int]
    logits: torch.Tensor           # [steps, vocab] raw logits per decode step
    context: LanceContext


def _task(method):
    """A public task: one call at a time per pipeline (the VAE's frame cache and the modules' device moves are
    shared state), and a torch out-of-memory error becomes `OutOfMemory` after what the call held is freed."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            except BaseException:
                self._release_scratch()
                raise
            # outside the except block: the torch error's traceback (and the tensors its frames hold) is gone
            self._release_scratch()
            raise OutOfMemory(f"{method.__name__} ran out of memory on {self.device} ({detail}); {HINT}. "
                              "The model is still loaded and usable.")
    return run


class LancePipeline(nn.Module):
    """One loaded Lance. Safe to share between threads: the public task methods run one at a time (calls from
    other threads wait). Inputs are checked before work starts (InputError naming the argument; OutOfMemory when
    a request cannot fit); `cancel` callables are polled inside every long loop; after Cancelled or OutOfMemory the
    pipeline stays usable. The weights are private copies: `changed_files()` tells a host whether the release
    files changed since the load."""

    def __init__(self, paths: ReleasePaths, llm: nn.Module, tokenizer: LanceTokenizer, vit: LanceViT, vae: LanceVAE,
                 memory: str = "resident", execution_device: torch.device | None = None,
                 file_state: dict | None = None):
        super().__init__()
        self._lock = threading.RLock()
        # host hook: make_room(bytes, device) is called when a request's estimate exceeds the free memory, before
        # it is refused (ComfyUI: unload other models); None = refuse straight away
        self.make_room: Callable[[int, torch.device], None] | None = None
        # host hook: a value that changes whenever the host changes the weights in place (ComfyUI: the weight
        # patches applied); part of the prefix-store key. The library's own weights never change.
        self.weights_version: Callable[[], object] = lambda: None
        self.prefixes = PrefixStore()   # the last request's prefilled prefixes (prefix_store.py)
        self.encodings = EncodeStore()  # recent source media's VAE posteriors and ViT embeddings (encode_store.py)
        self._file_state = file_state if file_state is not None else paths.snapshot()
        self.paths, self.tokenizer = paths, tokenizer
        self.llm = llm
        self.vit_model, self.vae_model = vit.module, vae.module  # registered so .to()/state_dict see them
        self.vit, self.vae = vit, vae
        self.memory = memory
        self.execution_device = execution_device or llm.device
        llm.execution_device = self.execution_device
        self.model_id = _fingerprint(paths)

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.llm.config

    @property
    def variant(self) -> str:
        return self.paths.variant

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def device(self) -> torch.device:
        return self.execution_device

    def changed_files(self) -> list[str]:
        """Files of the release folder that were replaced, rewritten, truncated or removed since this pipeline was
        loaded (size, mtime or inode differ). The loaded weights are private copies, so runs stay safe; a host
        that wants the new files should load again."""
        now = self.paths.snapshot()
        return [path for path, state in self._file_state.items() if now.get(path) != state]

    def _release_scratch(self) -> None:
        """After a failed or cancelled call: drop the VAE's frame cache, the stored prefixes and encodings and
        unreferenced tensors."""
        self.vae_model.clear_cache()
        self.prefixes.clear()
        self.encodings.clear()
        gc.collect()
        if self.execution_device.type == "cuda":
            torch.cuda.empty_cache()

    def _llm_cancel_points(self, cancel):
        layers = self.llm.language_model.model.layers
        return cancel_hooks([(f"LLM layer {i}", layer) for i, layer in enumerate(layers)], cancel)

    def _vae_cancel_points(self, cancel):
        """The Wan VAE calls its decoder once per latent frame and its encoder once per chunk of frames."""
        module = self.vae_model
        return cancel_hooks([("VAE decode", module.decoder), ("VAE encode", module.encoder)], cancel)

    def _vit_cancel_points(self, cancel):
        return cancel_hooks([(f"ViT block {i}", block) for i, block in enumerate(self.vit_model.blocks)], cancel)

    def _stage_weights(self, module: nn.Module) -> int:
        """Bytes a stage's weights add on the device while it runs (offload mode), else 0."""
        if self.memory != "offload" or _on_device(module, self.execution_device):
            return 0
        return module_bytes(module)
    @contextlib.contextmanager
    def _use(self, module: nn.Module):
        """A stage's module runs on the execution device. In offload mode it visits only while it runs. In
        resident mode the ViT and VAE are moved there if a host left them elsewhere (ComfyUI's partial low-VRAM
        loading streams only layers built from its ops); the LLM is built from those ops, so where its weights
        sit is the host's business."""
        if self.memory != "offload":
            if module is not self.llm and not _on_device(module, self.execution_device):
                module.to(self.execution_device)
            yield
            return
        module.to(self.execution_device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.execution_device.type == "cuda":
                torch.cuda.empty_cache()

    # -- generation: prepare ----------------------------------------------------------------------------
    @_task
    def prepare_text_to_image(self, prompt: str, width: int = 768, height: int = 768,
                              negative_prompt: str = "") -> GenerationInputs:
        grid = LatentGrid(1, *self._latent_size(height, width))
        sequence = lambda text: text_to_visual_sequence(self.tokenizer, self.config, text, grid, video=False)
        return GenerationInputs(sequence(require_text(prompt, "prompt")), grid,
                                negative_seq=_negative_sequence(negative_prompt, sequence))

    @_task
    def prepare_text_to_video(self, prompt: str, width: int = 848, height: int = 480, num_frames: int = 61,
                              start_image=None, resolution: str = "video_480p",
                              settings: GenerationSettings | None = None, negative_prompt: str = "") -> GenerationInputs:
        prompt = require_text(prompt, "prompt")
        c = self.config.constants
        frames = latent_frames(num_frames, c.vae_temporal_factor, c.max_num_frames)
        first = None
        if start_image is not None:
            image = as_frames(start_image, "start_image")[:1]
            latent = self._encode_condition(vae_pixels(image, preset_sides(resolution)[0]), settings)
            if (latent.shape[-2], latent.shape[-1]) != (self._latent_size(height, width)):
                log.info("i2v: output size follows the start image bucket: %dx%d", latent.shape[-1] * 16, latent.shape[-2] * 16)
            height, width = latent.shape[-2] * c.vae_spatial_factor, latent.shape[-1] * c.vae_spatial_factor
            first = video_to_tokens(latent)[0]
        grid = LatentGrid(frames, *self._latent_size(height, width))
        sequence = lambda text: text_to_visual_sequence(self.tokenizer, self.config, text, grid, video=True)
        return GenerationInputs(sequence(prompt), grid, first_frame=first,
                                negative_seq=_negative_sequence(negative_prompt, sequence))

    @_task
    def prepare_edit(self, media, instruction: str, *, video: bool, resolution: str, fps: float | None = None,
                     settings: GenerationSettings | None = None, negative_prompt: str = "") -> GenerationInputs:
        settings = settings or GenerationSettings()
        require_bool(video, "video")
        instruction = require_text(instruction, "instruction")
        frames = self._source_frames(media, video, fps, settings.context)
        vae_side, vit_side = preset_sides(resolution)
        source = self._encode_condition(vae_pixels(frames, vae_side), settings)
        grid = LatentGrid(*source.shape[2:])
        self._check_latent_size(grid.height, grid.width, f"the {resolution} bucket of this source")
        vit_px = vit_pixels(frames, vit_side)
        vit_embeds, = self.encodings.get_or_compute("vit", vit_px, self._encoding_context(),
                                                   lambda: (self._vit_embed(vit_px, settings.cancel),))
        _, vit_grid = self.vit.patchify(vit_px)
        history = self._history(settings.context, settings.include_history)
        sequence = lambda text: edit_sequence(self.tokenizer, self.config, text, vit_grid, grid, video, history)
        return GenerationInputs(sequence(instruction), grid, [vit_embeds], [video_to_tokens(source)[0]],
                                negative_seq=_negative_sequence(negative_prompt, sequence))

    # -- generation: run --------------------------------------------------------------------------------
    @_task
    def generate(self, task: str, request: str, inputs: GenerationInputs, settings: GenerationSettings,
                 noise: torch.Tensor | None = None, observer: Callable[[StepInfo], None] | None = None) -> GenerationResult:
        """Sample (seeds seed..seed+B-1 modulo 2^64 unless `noise` [B, N, C] is given), decode and extend the context."""
        if not isinstance(settings, GenerationSettings):
            raise InputError(f"settings must be GenerationSettings, got {type(settings).__name__}")
        if not isinstance(inputs, GenerationInputs):
            raise InputError(f"inputs must come from a prepare_* method, got {type(inputs).__name__}")
        settings.validate()
        require_callable(observer, "observer")
        if settings.context is not None:
            settings.context.check_model(self.model_id)
        options = settings.sampler_options()
        if noise is None:
            noise = initial_noise(inputs, batch_seeds(settings.seed, settings.batch_size),
                                  self.config.constants.latent_channels)
        else:
            self._check_noise(noise, inputs)
        self._generation_estimate(inputs, options, noise.shape[0], settings.decode).check(self.device, make_room=self.make_room)
        with self._use(self.llm), self._llm_cancel_points(settings.cancel):
            tokens = run_generation(self.llm, inputs, options, noise, self._step_hook(inputs.target, settings, observer),
                                    settings.cancel, store=self.prefixes, weights_version=self.weights_version())
        latents = tokens_to_video(tokens.cpu(), inputs.target)
        frames = self.decode_latents(latents, cancel=settings.cancel) if settings.decode else None
        context = (settings.context or LanceContext(self.model_id)).append(
            Turn(task, request, media=frames[0] if frames is not None else None))
        return GenerationResult(latents, self.vae.denormalize(latents).cpu(), frames, context)

    def _check_noise(self, noise, inputs: GenerationInputs) -> None:
        require_finite_tensor(noise, "noise")
        channels = self.config.constants.latent_channels
        if noise.dim() != 3 or noise.shape[1:] != (inputs.target.tokens, channels) or not 1 <= noise.shape[0] <= MAX_BATCH:
            raise InputError(f"noise must be [B, {inputs.target.tokens}, {channels}] with B in 1..{MAX_BATCH}, "
                             f"got shape {tuple(noise.shape)}")

    def _generation_estimate(self, inputs: GenerationInputs, options: SamplerOptions, batch: int,
                             decode: bool) -> Estimate:
        """Lower-bound bytes of the sampling stage (KV cache of both CFG branches + the largest forward) and of
        the decode stage."""
        cfg, seq = self.config, inputs.seq
        target = seq.target_split
        guided = any(options.guidance.active(float(t)) for t in flow_timesteps(options.steps, options.shift)[:-1])
        rows = batch * (2 if guided else 1)
        longest_prefill = max((s.length for s in seq.splits if s.end <= target.start), default=0)
        estimate = Estimate()
        estimate.add("sampling", "KV cache", kv_cache_bytes(cfg, rows, target.start + target.length, self.dtype))
        estimate.add("sampling", "activations",
                     forward_activation_bytes(cfg, max(longest_prefill, batch * target.length), self.dtype))
        estimate.add("sampling", "LLM weights", self._stage_weights(self.llm))
        if decode:
            self._add_decode(estimate, inputs.target.frames, inputs.target.height, inputs.target.width, batch)
        return estimate

    def _add_decode(self, estimate: Estimate, frames: int, height: int, width: int, batch: int) -> None:
        c = self.config.constants
        estimate.add("VAE decode", "VAE working set and output", vae_decode_bytes(
            int(self.vae_model.config.decoder_base_dim), c.vae_temporal_factor * (frames - 1) + 1,
            height * c.vae_spatial_factor, width * c.vae_spatial_factor, batch, self.vae.dtype, self.vae.tiling_enabled))
        estimate.add("VAE decode", "VAE weights", self._stage_weights(self.vae_model))

    def _step_hook(self, grid: LatentGrid, settings: GenerationSettings, observer):
        if settings.on_step is None and observer is None:
            return None

        def hook(info: StepInfo) -> None:
            if observer is not None:
                observer(info)
            if settings.on_step is not None:
                settings.on_step(info.step, info.total, tokens_to_video(info.x0.cpu(), grid))
        return hook

    # -- generation: one call per task ------------------------------------------------------------------
    @_task
    def text_to_image(self, prompt: str, *, width: int = 768, height: int = 768, **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_text_to_image(self._with_history(prompt, settings), width, height, settings.negative_prompt)
        return self.generate("t2i", prompt, inputs, settings)

    @_task
    def text_to_video(self, prompt: str, *, width: int = 848, height: int = 480, num_frames: int = 61,
                      start_image=None, resolution: str = "video_480p", **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_text_to_video(self._with_history(prompt, settings), width, height, num_frames,
                                            start_image, resolution, settings, settings.negative_prompt)
        return self.generate("i2v" if start_image is not None else "t2v", prompt, inputs, settings)

    @_task
    def edit_image(self, image, instruction: str, *, resolution: str = "image_768res", **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_edit(image, instruction, video=False, resolution=resolution, settings=settings,
                                   negative_prompt=settings.negative_prompt)
        return self.generate("image_edit", instruction, inputs, settings)

    @_task
    def edit_video(self, video, instruction: str, *, resolution: str = "video_480p", fps: float | None = None,
                   **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_edit(video, instruction, video=True, resolution=resolution, fps=fps, settings=settings,
                                   negative_prompt=settings.negative_prompt)
        return self.generate("video_edit", instruction, inputs, settings)

    @_task
    def decode_latents(self, latents: torch.Tensor, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Normalized latents [B, C, t, h, w] -> frames [B, T, H, W, 3] in 0..1 (CPU, fp32). At most the model's
        latent size per side and latent frames; `cancel` is polled before every latent frame."""
        self._check_latents(latents, "latents")
        require_callable(cancel, "cancel")
        estimate = Estimate()
        self._add_decode(estimate, *latents.shape[2:], latents.shape[0])
        estimate.check(self.device, make_room=self.make_room)
        with self._use(self.vae_model), torch.inference_mode(), self._vae_cancel_points(cancel):
            pixels = self.vae.decode(latents)
        return ((pixels.cpu() + 1) / 2).permute(0, 2, 3, 4, 1).contiguous()

    def _check_latents(self, latents, what: str) -> None:
        c = self.config.constants
        if not isinstance(latents, torch.Tensor):
            raise InputError(f"{what} must be a torch tensor, got {type(latents).__name__}")
        shape = tuple(latents.shape)
        if latents.dim() != 5 or shape[1] != self.vae.z_dim:
            raise InputError(f"{what} must be [B, {self.vae.z_dim}, t, h, w], got shape {shape}")
        b, _, t, h, w = shape
        if not (1 <= b <= MAX_BATCH and 1 <= t <= c.max_latent_frames and 1 <= h <= c.max_latent_size
                and 1 <= w <= c.max_latent_size):
            raise InputError(f"{what} of shape {shape} is outside what the model supports: batch 1..{MAX_BATCH}, "
                             f"1..{c.max_latent_frames} latent frames ({c.max_num_frames} video frames) and "
                             f"1..{c.max_latent_size} latent rows/columns ({c.max_latent_size * c.vae_spatial_factor} px)")
        require_finite_tensor(latents, what)  # after the size check: a huge tensor is refused before it is scanned

    @_task
    def decode_raw_latents(self, samples: torch.Tensor, cancel: Callable[[], bool] | None = None,
                           what: str = "latents") -> torch.Tensor:
        """Un-normalized Wan2.2 latents (ComfyUI LATENT "samples") -> frames [B, T, H, W, 3]; checked like
        decode_latents before anything is computed from them. `what` names the input in errors."""
        self._check_latents(samples, what)
        return self.decode_latents(self.vae.normalize(samples), cancel=cancel)

    # -- understanding ----------------------------------------------------------------------------------
    @_task
    def understand(self, media, question: str, *, instruction: str | None = None, resolution: str | None = None,
                   max_new_tokens: int = 256, sampling: SamplingOptions | None = None,
                   on_token: Callable[[str], None] | None = None, cancel: Callable[[], bool] | None = None,
                   context: LanceContext | None = None, fps: float | None = None,
                   include_history: bool = False, stop_tokens: tuple[str, ...] = ()) -> UnderstandingResult:
        """Answer `question` about an image/video (or the context's last media). Decoding stops at <|im_end|>
        or any of `stop_tokens` (token strings of the vocabulary, e.g. "<|endoftext|>")."""
        _check_context(context)
        if context is not None:
            context.check_model(self.model_id)
        require_bool(include_history, "include_history")
        require_callable(cancel, "cancel")
        require_callable(on_token, "on_token")
        question = optional_text(question, "question")
        if media is None and context is not None:
            media = context.last_media()
        frames = as_frames(media, "media", fps) if media is not None else None
        is_video = frames is not None and len(frames) > 1
        vit_embeds, vit_grid = [], None
        if frames is not None:
            vit_side = preset_sides(resolution or ("video_480p" if is_video else "image_768res"))[1]
            vit_px = vit_pixels(frames, vit_side)
            with self._use(self.vit_model), self._vit_cancel_points(cancel):
                vit_embeds = [self.vit.embed(vit_px)]
            vit_grid = self.vit.patchify(vit_px)[1]
        elif not question:
            raise InputError("question is empty and no image or video was given")
        instruction = instruction or (VIDEO_QUESTION_SYSTEM if is_video else IMAGE_QUESTION_SYSTEM)
        history = self._history(context, include_history)
        seq = understanding_sequence(self.tokenizer, self.config, require_text(instruction, "instruction"),
                                     question, vit_grid, history)
        result = self._decode_text(seq, vit_embeds, max_new_tokens, sampling, on_token, cancel, stop_tokens)
        turn = Turn("x2t_video" if is_video else "x2t_image", question, result[0],
                    unit_frames(frames) if frames is not None else None)
        return UnderstandingResult(result[0], result[1], result[2], (context or LanceContext(self.model_id)).append(turn))

    @_task
    def enhance_prompt(self, prompt: str, *, target: str = "image", max_new_tokens: int = 256,
                       sampling: SamplingOptions | None = None, cancel: Callable[[], bool] | None = None) -> str:
        """Rewrite a short prompt into a detailed one with Lance's own understanding expert (no external service)."""
        require_choice(target, "target", ("image", "video"))
        require_callable(cancel, "cancel")
        prompt = require_text(prompt, "prompt")
        motion = ", and the motion of subjects and camera over time" if target == "video" else ""
        instruction = ENHANCE_INSTRUCTION.format(kind=target, motion=motion)
        seq = understanding_sequence(self.tokenizer, self.config, instruction, prompt, None)
        text = self._decode_text(seq, [], max_new_tokens, sampling, None, cancel)[0]
        return text or prompt

    def _decode_text(self, seq, vit_embeds, max_new_tokens, sampling, on_token, cancel, stop_tokens=()):
        self._check_decode_request(seq, max_new_tokens, sampling, stop_tokens)
        stop = self.tokenizer.special.im_end
        stop_ids = {stop} | {self.tokenizer.token_id(token, "stop_tokens") for token in stop_tokens}
        emitted: list[int] = []

        def token_hook(token: int) -> None:
            emitted.append(token)
            if on_token is not None:
                on_token(self.tokenizer.decode([t for t in emitted if t not in stop_ids]))
        with self._use(self.llm), self._llm_cancel_points(cancel):
            out = decode(self.llm, seq, prompt_embeddings(self.llm, seq, vit_embeds), max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, vocab_limit=self.tokenizer.vocab_limit, sampling=sampling or SamplingOptions(),
                         on_token=token_hook, cancel=cancel)
        text = self.tokenizer.decode([t for t in out.ids if t not in stop_ids]).strip()
        return text, out.ids, out.logits

    def _check_decode_request(self, seq, max_new_tokens, sampling, stop_tokens) -> None:
        """Bounded token budget (the KV cache is preallocated for all of it) that fits the model's positions and
        the device's memory."""
        require_int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        prompt_len = len(seq)
        limit = self.config.max_positions
        if limit is not None and prompt_len + max_new_tokens > limit:
            raise InputError(f"max_new_tokens {max_new_tokens} + the prompt's {prompt_len} tokens exceed the model's "
                             f"{limit} positions (max_position_embeddings)")
        if sampling is not None and not isinstance(sampling, SamplingOptions):
            raise InputError(f"sampling must be SamplingOptions or None, got {type(sampling).__name__}")
        if not isinstance(stop_tokens, (tuple, list)):
            raise InputError(f"stop_tokens must be a tuple of token strings, got {type(stop_tokens).__name__}")
        longest = max((s.length for s in seq.splits), default=prompt_len)
        Estimate().add("text decoding", "KV cache", kv_cache_bytes(self.config, 1, prompt_len + max_new_tokens, self.dtype)) \
            .add("text decoding", "activations", forward_activation_bytes(self.config, longest, self.dtype)) \
            .add("text decoding", "LLM weights", self._stage_weights(self.llm)).check(self.device, make_room=self.make_room)

    # -- helpers ----------------------------------------------------------------------------------------
    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config.constants
        limit = c.vae_spatial_factor * c.max_latent_size
        h = round_size(height, c.vae_spatial_factor, "height", limit) // c.vae_spatial_factor
        w = round_size(width, c.vae_spatial_factor, "width", limit) // c.vae_spatial_factor
        return h, w

    def _check_latent_size(self, h: int, w: int, what: str) -> None:
        c = self.config.constants
        if max(h, w) > c.max_latent_size:
            limit = c.max_latent_size * c.vae_spatial_factor
            raise InputError(f"{what} is {w * c.vae_spatial_factor}x{h * c.vae_spatial_factor}; the model supports "
                             f"at most {limit} px per side: choose a smaller resolution preset")

    def _source_frames(self, media, video: bool, fps: float | None, context: LanceContext | None) -> np.ndarray:
        kind = "video" if video else "image"
        if media is None and context is not None:
            media = context.last_media(kind)
        frames = as_frames(media, kind, fps)
        if not video and len(frames) != 1:
            raise InputError(f"image has {len(frames)} frames; use the video edit for clips (or pass one frame)")
        if video and len(frames) < 2:
            raise InputError(f"video has {len(frames)} frame; a video needs at least 2 frames (typically 4k+1 "
                             f"such as 5, 17 or 61): use edit_image for a single image")
        if video:
            t = self.config.constants.vae_temporal_factor
            usable = min((len(frames) - 1) // t * t + 1, self.config.constants.max_num_frames)
            if usable != len(frames):
                log.warning("video has %d frames: using the first %d (a 4k+1 count)", len(frames), usable)
            frames = frames[:usable]
        return frames

    def _encode_condition(self, pixels: torch.Tensor, settings: GenerationSettings | None) -> torch.Tensor:
        """Pixels [3, T, H, W] -> normalized condition latent [1, C, t, h, w] (mean, or the reference sample)."""
        cancel = settings.cancel if settings is not None else None
        mu, logvar = self.encodings.get_or_compute("vae", pixels, self._encoding_context(),
                                                   lambda: self._vae_encode(pixels, cancel))
        if settings is not None and settings.condition_sampling == "reference":
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            return self.vae.sample_posterior(mu.cpu(), logvar.cpu(), generator)
        return mu.cpu()

    def _vae_encode(self, pixels: torch.Tensor, cancel) -> tuple[torch.Tensor, torch.Tensor]:
        frames, height, width = pixels.shape[1:]
        Estimate().add("VAE encode", "VAE working set", vae_encode_bytes(
            int(self.vae_model.config.base_dim), frames, height, width, self.vae.dtype, self.vae.tiling_enabled)) \
            .add("VAE encode", "VAE weights", self._stage_weights(self.vae_model)).check(self.device, make_room=self.make_room)
        with self._use(self.vae_model), torch.inference_mode(), self._vae_cancel_points(cancel):
            return self.vae.encode(pixels.unsqueeze(0))

    def _vit_embed(self, vit_px: torch.Tensor, cancel) -> torch.Tensor:
        with self._use(self.vit_model), self._vit_cancel_points(cancel):
            return self.vit.embed(vit_px)

    def _encoding_context(self) -> tuple:
        """What a stored encoding depends on besides the pixels: the dtype, the VAE tiling and the weights."""
        return (str(self.dtype), self.vae.tiling_enabled, repr(self.weights_version()))

    @staticmethod
    def _history(context: LanceContext | None, include: bool) -> list[Text]:
        """The context's earlier turns as prompt text, one line each (only when asked for)."""
        if not include or context is None:
            return []
        return [Text(line + "\n") for line in context.transcript()]

    def _with_history(self, prompt: str, settings: GenerationSettings) -> str:
        """t2i/t2v have no user-turn slot besides the caption: earlier turns are prepended to it."""
        lines = [t.text for t in self._history(settings.context, settings.include_history)]
        return "".join(lines) + prompt if lines and isinstance(prompt, str) else prompt


def _check_context(context) -> None:
    if context is not None and not isinstance(context, LanceContext):
        raise InputError(f"context must be a LanceContext from this library, got {type(context).__name__}")


def _negative_sequence(negative_prompt, sequence):
    """The negative prompt packed like the prompt (None for an empty one: the official caption-dropped branch)."""
    if negative_prompt is None or (isinstance(negative_prompt, str) and not negative_prompt.strip()):
        return None
    return sequence(require_text(negative_prompt, "negative_prompt"))


def _on_device(module: nn.Module, device: torch.device) -> bool:
    """True when all of the module's weights are on `device` ("cuda" without an index = the current GPU)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else None)
    return all(p.device.type == device.type and p.device.index == index for p in module.parameters())


def _fingerprint(paths: ReleasePaths) -> str:
    stat = paths.llm_weights.stat()
    digest = hashlib.sha1(f"{paths.llm_weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{paths.lance_dir.name}@{digest}"


def load_lance(root: str | Path, *, variant: str = "auto", dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", attention: str = "auto", operations=None,
               memory: str = "resident", vit_weights: str = "vit", vae_tiling: bool = False,
               weights_device: str | torch.device | None = None) -> LancePipeline:
    """Load a Lance release folder. dtype auto = bf16 on CUDA, fp32 on CPU. memory "offload" keeps the weights
    in CPU memory and moves each stage (ViT, LLM, VAE) to the device only while it runs. weights_device (resident
    only): where the weights are built when that is not `device`, for a host that moves or streams them itself
    (ComfyUI's model patcher); activations and the KV cache always live on `device`. vit_weights: "vit"
    (Qwen2.5-VL-ViT/vit.safetensors, default) or "lance" (the vit_model.* tensors of model.safetensors).
    vae_tiling: spatially tiled VAE encode/decode (less memory, pixels differ slightly from untiled; off as in
    the reference - untiled 480p x 121 frames already fits 12 GB)."""
    if memory not in MEMORY_MODES:
        raise InputError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if vit_weights not in ("vit", "lance"):
        raise InputError(f"vit_weights must be 'vit' or 'lance', got {vit_weights!r}")
    paths = resolve_release(root, variant)
    file_state = paths.snapshot()   # before reading: a file replaced during the load counts as changed
    execution_device = resolve_device(device)
    dtype = resolve_dtype(dtype, execution_device)
    if memory == "offload":
        load_device = torch.device("cpu")
    else:
        load_device = resolve_device(weights_device) if weights_device is not None else execution_device
    # all configs against their weight headers first: a broken ViT config must not wait for the LLM to load
    lance_vit = paths.llm_weights if vit_weights == "lance" else None
    llm_config, _ = check_llm_files(paths, operations or TorchOps)
    check_vit_files(paths.vit_config.parent, lance_vit)
    # the VAE first: its .pth is read through a memory map whose pages stay resident until its load ends, which
    # then adds to the smallest total (and a broken VAE file fails before the LLM is read)
    vae = load_vae(paths.vae_weights, dtype, load_device)
    if vae.z_dim != llm_config.constants.latent_channels:
        raise InputError(f"VAE latent channels {vae.z_dim} do not match the model's {llm_config.constants.latent_channels}")
    if vae_tiling:
        vae.enable_tiling()
    llm = load_llm(paths, dtype, load_device, operations or TorchOps, Attention(attention))
    tokenizer = LanceTokenizer(paths.lance_dir, llm.config)
    vit = load_vit(paths.vit_config.parent, dtype, load_device, lance_weights=lance_vit)
    if vit.out_hidden_size != llm.config.hidden_size:
        raise InputError(f"ViT output width {vit.out_hidden_size} does not match the LLM hidden size {llm.config.hidden_size}")
    log.info("Lance loaded from %s (%s, %s, %s, attention=%s, memory=%s, ViT weights from %s)", paths.root,
             paths.lance_dir.name, dtype, execution_device, llm.attention.name, memory,
             paths.llm_weights.name + " vit_model.*" if vit_weights == "lance" else "Qwen2.5-VL-ViT/vit.safetensors")
    return LancePipeline(paths, llm, tokenizer, vit, vae, memory, execution_device, file_state)
