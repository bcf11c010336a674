"""The task API: one loaded Lance (LLM + ViT + VAE + tokenizer) and a method per task.

Every generation task is two steps, both public: `prepare_*` turns the request into `GenerationInputs` (packed
sequence, ViT embeddings, clean condition latents), and `generate` samples and decodes. Latents are returned
normalized (model space) and un-normalized (`comfy_latent()`, the layout ComfyUI's Wan2.2 VAE decodes).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
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
from .errors import InputError
from .generation import (GenerationInputs, LatentGrid, edit_sequence, initial_noise, run_generation,
                         text_to_visual_sequence, tokens_to_video, video_to_tokens)
from .inputs import as_frames, latent_frames, optional_text, require_text, round_size, unit_frames
from .loader import load_llm
from .media import preset_sides, vae_pixels, vit_pixels
from .ops import TorchOps
from .sampler import GuidanceOptions, SamplerOptions, StepInfo
from .templates import IMAGE_QUESTION_SYSTEM, VIDEO_QUESTION_SYSTEM, Text
from .tokenizer import LanceTokenizer
from .understanding import SamplingOptions, decode, prompt_embeddings, understanding_sequence
from .vae import LanceVAE, load_vae
from .vit import LanceViT, load_vit

log = logging.getLogger(__name__)
MEMORY_MODES = ("resident", "offload")
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

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        settings = cls(**kwargs)
        if not isinstance(settings.batch_size, int) or not 1 <= settings.batch_size <= 64:
            raise InputError(f"batch_size must be an integer in 1..64, got {settings.batch_size!r}")
        if settings.euler_state not in ("fp32", "bf16"):
            raise InputError(f"euler_state must be 'fp32' or 'bf16', got {settings.euler_state!r}")
        if settings.condition_sampling not in ("mean", "reference"):
            raise InputError(f"condition_sampling must be 'mean' or 'reference', got {settings.condition_sampling!r}")
        return settings

    def sampler_options(self) -> SamplerOptions:
        guidance = GuidanceOptions(float(self.cfg_scale), tuple(self.cfg_interval), self.cfg_renorm,
                                   float(self.cfg_renorm_min), self.uncond_positions)
        state = torch.float32 if self.euler_state == "fp32" else torch.bfloat16
        return SamplerOptions(self.steps, float(self.shift), guidance, self.batched_cfg, state)


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


class LancePipeline(nn.Module):
    def __init__(self, paths: ReleasePaths, llm: nn.Module, tokenizer: LanceTokenizer, vit: LanceViT, vae: LanceVAE,
                 memory: str = "resident", execution_device: torch.device | None = None):
        super().__init__()
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
    def prepare_text_to_image(self, prompt: str, width: int = 768, height: int = 768,
                              negative_prompt: str = "") -> GenerationInputs:
        grid = LatentGrid(1, *self._latent_size(height, width))
        sequence = lambda text: text_to_visual_sequence(self.tokenizer, self.config, text, grid, video=False)
        return GenerationInputs(sequence(require_text(prompt, "prompt")), grid,
                                negative_seq=_negative_sequence(negative_prompt, sequence))

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

    def prepare_edit(self, media, instruction: str, *, video: bool, resolution: str, fps: float | None = None,
                     settings: GenerationSettings | None = None, negative_prompt: str = "") -> GenerationInputs:
        settings = settings or GenerationSettings()
        instruction = require_text(instruction, "instruction")
        frames = self._source_frames(media, video, fps, settings.context)
        vae_side, vit_side = preset_sides(resolution)
        source = self._encode_condition(vae_pixels(frames, vae_side), settings)
        grid = LatentGrid(*source.shape[2:])
        self._check_latent_size(grid.height, grid.width, f"the {resolution} bucket of this source")
        vit_px = vit_pixels(frames, vit_side)
        with self._use(self.vit_model):
            vit_embeds = self.vit.embed(vit_px)
        _, vit_grid = self.vit.patchify(vit_px)
        history = self._history(settings.context, settings.include_history)
        sequence = lambda text: edit_sequence(self.tokenizer, self.config, text, vit_grid, grid, video, history)
        return GenerationInputs(sequence(instruction), grid, [vit_embeds], [video_to_tokens(source)[0]],
                                negative_seq=_negative_sequence(negative_prompt, sequence))

    # -- generation: run --------------------------------------------------------------------------------
    def generate(self, task: str, request: str, inputs: GenerationInputs, settings: GenerationSettings,
                 noise: torch.Tensor | None = None, observer: Callable[[StepInfo], None] | None = None) -> GenerationResult:
        """Sample (seeds seed..seed+B-1 unless `noise` [B, N, C] is given), decode and extend the context."""
        if settings.context is not None:
            settings.context.check_model(self.model_id)
        options = settings.sampler_options()
        if noise is None:
            seeds = [settings.seed + i for i in range(settings.batch_size)]
            noise = initial_noise(inputs, seeds, self.config.constants.latent_channels)
        with self._use(self.llm):
            tokens = run_generation(self.llm, inputs, options, noise, self._step_hook(inputs.target, settings, observer),
                                    settings.cancel)
        latents = tokens_to_video(tokens.cpu(), inputs.target)
        frames = self.decode_latents(latents) if settings.decode else None
        context = (settings.context or LanceContext(self.model_id)).append(
            Turn(task, request, media=frames[0] if frames is not None else None))
        return GenerationResult(latents, self.vae.denormalize(latents).cpu(), frames, context)

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
    def text_to_image(self, prompt: str, *, width: int = 768, height: int = 768, **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_text_to_image(self._with_history(prompt, settings), width, height, settings.negative_prompt)
        return self.generate("t2i", prompt, inputs, settings)

    def text_to_video(self, prompt: str, *, width: int = 848, height: int = 480, num_frames: int = 61,
                      start_image=None, resolution: str = "video_480p", **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_text_to_video(self._with_history(prompt, settings), width, height, num_frames,
                                            start_image, resolution, settings, settings.negative_prompt)
        return self.generate("i2v" if start_image is not None else "t2v", prompt, inputs, settings)

    def edit_image(self, image, instruction: str, *, resolution: str = "image_768res", **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_edit(image, instruction, video=False, resolution=resolution, settings=settings,
                                   negative_prompt=settings.negative_prompt)
        return self.generate("image_edit", instruction, inputs, settings)

    def edit_video(self, video, instruction: str, *, resolution: str = "video_480p", fps: float | None = None,
                   **options) -> GenerationResult:
        settings = GenerationSettings.from_kwargs(options)
        inputs = self.prepare_edit(video, instruction, video=True, resolution=resolution, fps=fps, settings=settings,
                                   negative_prompt=settings.negative_prompt)
        return self.generate("video_edit", instruction, inputs, settings)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, t, h, w] -> frames [B, T, H, W, 3] in 0..1 (CPU, fp32)."""
        if latents.dim() != 5 or latents.shape[1] != self.vae.z_dim:
            raise InputError(f"latents must be [B, {self.vae.z_dim}, t, h, w], got shape {tuple(latents.shape)}")
        with self._use(self.vae_model), torch.inference_mode():
            pixels = self.vae.decode(latents)
        return ((pixels.cpu() + 1) / 2).permute(0, 2, 3, 4, 1).contiguous()

    # -- understanding ----------------------------------------------------------------------------------
    def understand(self, media, question: str, *, instruction: str | None = None, resolution: str | None = None,
                   max_new_tokens: int = 256, sampling: SamplingOptions | None = None,
                   on_token: Callable[[str], None] | None = None, cancel: Callable[[], bool] | None = None,
                   context: LanceContext | None = None, fps: float | None = None,
                   include_history: bool = False, stop_tokens: tuple[str, ...] = ()) -> UnderstandingResult:
        """Answer `question` about an image/video (or the context's last media). Decoding stops at <|im_end|>
        or any of `stop_tokens` (token strings of the vocabulary, e.g. "<|endoftext|>")."""
        if context is not None:
            context.check_model(self.model_id)
        question = optional_text(question, "question")
        if media is None and context is not None:
            media = context.last_media()
        frames = as_frames(media, "media", fps) if media is not None else None
        is_video = frames is not None and len(frames) > 1
        vit_embeds, vit_grid = [], None
        if frames is not None:
            vit_side = preset_sides(resolution or ("video_480p" if is_video else "image_768res"))[1]
            vit_px = vit_pixels(frames, vit_side)
            with self._use(self.vit_model):
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

    def enhance_prompt(self, prompt: str, *, target: str = "image", max_new_tokens: int = 256,
                       sampling: SamplingOptions | None = None, cancel: Callable[[], bool] | None = None) -> str:
        """Rewrite a short prompt into a detailed one with Lance's own understanding expert (no external service)."""
        if target not in ("image", "video"):
            raise InputError(f"target must be 'image' or 'video', got {target!r}")
        prompt = require_text(prompt, "prompt")
        motion = ", and the motion of subjects and camera over time" if target == "video" else ""
        instruction = ENHANCE_INSTRUCTION.format(kind=target, motion=motion)
        seq = understanding_sequence(self.tokenizer, self.config, instruction, prompt, None)
        text = self._decode_text(seq, [], max_new_tokens, sampling, None, cancel)[0]
        return text or prompt

    def _decode_text(self, seq, vit_embeds, max_new_tokens, sampling, on_token, cancel, stop_tokens=()):
        stop = self.tokenizer.special.im_end
        stop_ids = {stop} | {self.tokenizer.token_id(token, "stop_tokens") for token in stop_tokens}
        emitted: list[int] = []

        def token_hook(token: int) -> None:
            emitted.append(token)
            if on_token is not None:
                on_token(self.tokenizer.decode([t for t in emitted if t not in stop_ids]))
        with self._use(self.llm):
            out = decode(self.llm, seq, prompt_embeddings(self.llm, seq, vit_embeds), max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, vocab_limit=self.tokenizer.vocab_limit, sampling=sampling or SamplingOptions(),
                         on_token=token_hook, cancel=cancel)
        text = self.tokenizer.decode([t for t in out.ids if t not in stop_ids]).strip()
        return text, out.ids, out.logits

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
        if video:
            t = self.config.constants.vae_temporal_factor
            usable = min((len(frames) - 1) // t * t + 1, self.config.constants.max_num_frames)
            if usable != len(frames):
                log.warning("video has %d frames: using the first %d (a 4k+1 count)", len(frames), usable)
            frames = frames[:usable]
        return frames

    def _encode_condition(self, pixels: torch.Tensor, settings: GenerationSettings | None) -> torch.Tensor:
        """Pixels [3, T, H, W] -> normalized condition latent [1, C, t, h, w] (mean, or the reference sample)."""
        with self._use(self.vae_model), torch.inference_mode():
            mu, logvar = self.vae.encode(pixels.unsqueeze(0))
        if settings is not None and settings.condition_sampling == "reference":
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            return self.vae.sample_posterior(mu.cpu(), logvar.cpu(), generator)
        return mu.cpu()

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
               memory: str = "resident", vit_weights: str = "vit", vae_tiling: bool = False) -> LancePipeline:
    """Load a Lance release folder. dtype auto = bf16 on CUDA, fp32 on CPU. memory "offload" keeps the weights
    in CPU memory and moves each stage (ViT, LLM, VAE) to the device only while it runs. vit_weights: "vit"
    (Qwen2.5-VL-ViT/vit.safetensors, default) or "lance" (the vit_model.* tensors of model.safetensors).
    vae_tiling: spatially tiled VAE encode/decode (less memory, pixels differ slightly from untiled; off as in
    the reference - untiled 480p x 121 frames already fits 12 GB)."""
    if memory not in MEMORY_MODES:
        raise InputError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if vit_weights not in ("vit", "lance"):
        raise InputError(f"vit_weights must be 'vit' or 'lance', got {vit_weights!r}")
    paths = resolve_release(root, variant)
    execution_device = resolve_device(device)
    dtype = resolve_dtype(dtype, execution_device)
    load_device = torch.device("cpu") if memory == "offload" else execution_device
    llm = load_llm(paths, dtype, load_device, operations or TorchOps, Attention(attention))
    tokenizer = LanceTokenizer(paths.lance_dir, llm.config)
    vit = load_vit(paths.vit_config.parent, dtype, load_device,
                   lance_weights=paths.llm_weights if vit_weights == "lance" else None)
    if vit.out_hidden_size != llm.config.hidden_size:
        raise InputError(f"ViT output width {vit.out_hidden_size} does not match the LLM hidden size {llm.config.hidden_size}")
    vae = load_vae(paths.vae_weights, dtype, load_device)
    if vae_tiling:
        vae.enable_tiling()
    if vae.z_dim != llm.config.constants.latent_channels:
        raise InputError(f"VAE latent channels {vae.z_dim} do not match the model's {llm.config.constants.latent_channels}")
    log.info("Lance loaded from %s (%s, %s, %s, attention=%s, memory=%s, ViT weights from %s)", paths.root,
             paths.lance_dir.name, dtype, execution_device, llm.attention.name, memory,
             paths.llm_weights.name + " vit_model.*" if vit_weights == "lance" else "Qwen2.5-VL-ViT/vit.safetensors")
    return LancePipeline(paths, llm, tokenizer, vit, vae, memory, execution_device)
