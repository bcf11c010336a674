"""The task API: `load_lance` and `LancePipeline`, one method per task over a loaded session.

Every generation task is two steps, both public: `prepare_*` turns the request into `GenerationInputs` (packed
sequence, ViT embeddings, clean condition latents), and `generate` samples and decodes. Latents are returned
normalized (model space) and un-normalized (`comfy_latent()`, the layout ComfyUI's Wan2.2 VAE decodes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .io.validation import require_bool
from .runtime.loader import load_session
from .runtime.session import SCOPE_VAE, LanceSession, task
from .tasks import encoders, generation, prepare, text_generation
from .tasks.context import LanceContext
from .tasks.generation import GenerationResult
from .tasks.request import GenerationInputs
from .tasks.sampler import StepInfo
from .tasks.settings import GenerationSettings
from .tasks.text_generation import UnderstandingResult
from .tasks.understanding import SamplingOptions


class LancePipeline:
    """One loaded Lance. Safe to share between threads: the task methods run one at a time (calls from other
    threads wait). Inputs are checked before work starts (InputError naming the argument; OutOfMemory when a
    request cannot fit); `cancel` callables are polled inside every long loop; after Cancelled or OutOfMemory the
    pipeline stays usable. The weights are private copies: `changed_files()` tells a host whether the release
    files changed since the load. Generation tasks take their options as keywords (see GenerationSettings) or
    as one `settings=GenerationSettings(...)`."""

    def __init__(self, session: LanceSession):
        self.session = session

    # -- what is loaded -----------------------------------------------------------------------------------
    config = property(lambda self: self.session.config)
    variant = property(lambda self: self.session.paths.variant)
    dtype = property(lambda self: self.session.dtype)
    device = property(lambda self: self.session.device)
    model_id = property(lambda self: self.session.model_id)
    paths = property(lambda self: self.session.paths)
    tokenizer = property(lambda self: self.session.tokenizer)
    llm = property(lambda self: self.session.llm)
    vit = property(lambda self: self.session.vit)
    vae = property(lambda self: self.session.vae)
    plan = property(lambda self: self.session.plan)   # the VRAM plan, when one places the weights
    prefixes = property(lambda self: self.session.prefixes)
    encodings = property(lambda self: self.session.encodings)

    def changed_files(self) -> list[str]:
        """Files of the release folder replaced, rewritten, truncated or removed since the load."""
        return self.session.changed_files()

    # -- generation: prepare ----------------------------------------------------------------------------
    @task
    def prepare_text_to_image(self, prompt: str, width: int = 768, height: int = 768,
                              negative_prompt: str = "") -> GenerationInputs:
        return prepare.text_to_image(self.session, prompt, width, height, negative_prompt)

    @task
    def prepare_text_to_video(self, prompt: str, width: int = 848, height: int = 480, num_frames: int = 61,
                              start_image=None, resolution: str = "video_480p",
                              settings: GenerationSettings | None = None, negative_prompt: str = "") -> GenerationInputs:
        return prepare.text_to_video(self.session, prompt, width, height, num_frames, start_image, resolution,
                                     settings, negative_prompt)

    @task
    def prepare_edit(self, media, instruction: str, *, video: bool, resolution: str, fps: float | None = None,
                     settings: GenerationSettings | None = None, negative_prompt: str = "") -> GenerationInputs:
        return prepare.edit(self.session, media, instruction, video=video, resolution=resolution, fps=fps,
                            settings=settings, negative_prompt=negative_prompt)

    # -- generation: run --------------------------------------------------------------------------------
    @task
    def generate(self, task: str, request: str, inputs: GenerationInputs, settings: GenerationSettings,
                 noise: torch.Tensor | None = None, observer: Callable[[StepInfo], None] | None = None) -> GenerationResult:
        """Sample (seeds per settings.seeds() unless `noise` [B, N, C] is given), decode, extend the context."""
        settings = GenerationSettings.of_call(settings, {})
        return generation.run(self.session, task, request, inputs, settings, noise, observer)

    @task
    def text_to_image(self, prompt: str, *, width: int = 768, height: int = 768,
                      settings: GenerationSettings | None = None, **options) -> GenerationResult:
        settings = GenerationSettings.of_call(settings, options)
        inputs = prepare.text_to_image(self.session, prepare.with_history(self.session, prompt, settings), width, height,
                                       settings.negative_prompt)
        return generation.run(self.session, "t2i", prompt, inputs, settings)

    @task
    def text_to_video(self, prompt: str, *, width: int = 848, height: int = 480, num_frames: int = 61,
                      start_image=None, resolution: str = "video_480p", settings: GenerationSettings | None = None,
                      **options) -> GenerationResult:
        settings = GenerationSettings.of_call(settings, options)
        inputs = prepare.text_to_video(self.session, prepare.with_history(self.session, prompt, settings), width, height,
                                       num_frames, start_image, resolution, settings, settings.negative_prompt)
        return generation.run(self.session, "i2v" if start_image is not None else "t2v", prompt, inputs, settings)

    @task
    def edit_image(self, image, instruction: str, *, resolution: str = "image_768res",
                   settings: GenerationSettings | None = None, **options) -> GenerationResult:
        settings = GenerationSettings.of_call(settings, options)
        inputs = prepare.edit(self.session, image, instruction, video=False, resolution=resolution, settings=settings,
                              negative_prompt=settings.negative_prompt)
        return generation.run(self.session, "image_edit", instruction, inputs, settings)

    @task
    def edit_video(self, video, instruction: str, *, resolution: str = "video_480p", fps: float | None = None,
                   settings: GenerationSettings | None = None, **options) -> GenerationResult:
        settings = GenerationSettings.of_call(settings, options)
        inputs = prepare.edit(self.session, video, instruction, video=True, resolution=resolution, fps=fps,
                              settings=settings, negative_prompt=settings.negative_prompt)
        return generation.run(self.session, "video_edit", instruction, inputs, settings)

    @task(scope=SCOPE_VAE)
    def decode_latents(self, latents: torch.Tensor, cancel: Callable[[], bool] | None = None,
                       tiled: bool = False) -> torch.Tensor:
        """Normalized latents [B, C, t, h, w] -> frames [B, T, H, W, 3] in 0..1 (CPU, fp32). At most the model's
        latent size per side and latent frames; `cancel` is polled before every latent frame; `tiled` decodes in
        spatial tiles (less memory; the pixels differ slightly from the reference). An untiled decode that runs out
        of memory is retried tiled after freeing; OutOfMemory when that fails too. Only the VAE runs (a host is
        told so: it need not load the rest)."""
        return generation.decode_latents(self.session, latents, cancel, require_bool(tiled, "tiled"))

    @task(scope=SCOPE_VAE)
    def decode_raw_latents(self, samples: torch.Tensor, cancel: Callable[[], bool] | None = None,
                           what: str = "latents", tiled: bool = False) -> torch.Tensor:
        """Un-normalized Wan2.2 latents (ComfyUI LATENT "samples") -> frames [B, T, H, W, 3], as decode_latents;
        checked like decode_latents before anything is computed from them. `what` names the input in errors."""
        generation.check_latents(self.session, samples, what)
        require_bool(tiled, "tiled")
        return generation.decode_latents(self.session, self.vae.normalize(samples), cancel, tiled)

    @task(scope=SCOPE_VAE)
    def encode_raw_latents(self, frames: torch.Tensor, cancel: Callable[[], bool] | None = None,
                           what: str = "frames", tiled: bool = False) -> torch.Tensor:
        """The inverse of decode_raw_latents: frames [T, H, W, 3] in 0..1 (T = 4k+1, H and W multiples of 16) ->
        un-normalized Wan2.2 latents [1, C, t, h, w], the VAE posterior mean (CPU, fp32). No resizing: the
        frames are encoded as given. Out of memory untiled: retried tiled after freeing, as decode_latents. `what`
        names the input in errors."""
        encoders.check_frames(self.session, frames, what)
        with self.vae.tiled(require_bool(tiled, "tiled")):
            return self.session.tiled_fallback(lambda: encoders.raw_latents(self.session, frames, cancel),
                                               "VAE encode")

    # -- understanding ----------------------------------------------------------------------------------
    @task
    def understand(self, media, question: str, *, instruction: str | None = None, resolution: str | None = None,
                   max_new_tokens: int = 256, sampling: SamplingOptions | None = None,
                   on_token: Callable[[str], None] | None = None, cancel: Callable[[], bool] | None = None,
                   context: LanceContext | None = None, fps: float | None = None,
                   include_history: bool = False, stop_tokens: tuple[str, ...] = (),
                   return_logits: bool = False) -> UnderstandingResult:
        """Answer `question` about an image/video (or the context's last media). Decoding stops at <|im_end|>
        or any of `stop_tokens` (token strings of the vocabulary, e.g. "<|endoftext|>"). `return_logits`: every
        decode step's logits in the result (copied to the host token by token, so off by default)."""
        request = prepare.question(self.session, media, question, instruction=instruction, resolution=resolution,
                                   fps=fps, context=context, include_history=include_history, cancel=cancel)
        return text_generation.answer(self.session, request, max_new_tokens=max_new_tokens, sampling=sampling,
                                      on_token=on_token, cancel=cancel, stop_tokens=stop_tokens,
                                      return_logits=return_logits)

    @task
    def enhance_prompt(self, prompt: str, *, target: str = "image", max_new_tokens: int = 256,
                       sampling: SamplingOptions | None = None, cancel: Callable[[], bool] | None = None) -> str:
        """Rewrite a short prompt into a detailed one with Lance's own understanding expert (no external service)."""
        seq = prepare.enhancement(self.session, prompt, target, cancel)
        text = text_generation.generate_text(self.session, seq, [], max_new_tokens=max_new_tokens, sampling=sampling,
                                             cancel=cancel)[0]
        return text or prompt.strip()


def load_lance(root: str | Path, *, variant: str = "auto", dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", attention: str = "auto", operations=None,
               memory: str = "resident", vit_weights: str = "vit", vae_tiling: bool = False,
               weights_device: str | torch.device | None = None, vram_budget: int | None = None,
               fp8: tuple[str, ...] = (), compile: bool = False, defer_placement: bool = False) -> LancePipeline:
    """Load a Lance release folder. dtype auto = bf16 on CUDA, fp32 on CPU.

    memory: "resident" (every weight on the device), "offload" (weights in CPU memory; each stage - ViT, LLM,
    VAE - visits the device only while it runs), "stream" (the LLM's layers stream from pinned CPU memory a few
    layers ahead; ViT and VAE visit as stages) or "auto" (a VRAM plan: the fastest bit-exact placement that
    fits `vram_budget` bytes, default the device's free memory; see vram_plan.py and `pipe.plan`). fp8: experts
    ("und", "gen") stored in fp8 in any of resident/stream/auto - never chosen by a plan itself: fp8 changes the
    picture and has not been validated on the release's weights. weights_device (resident only): where the
    weights are built when that is not
    `device`, for a host that moves or streams them itself (ComfyUI's model patcher); activations and the KV
    cache always live on `device`. vit_weights: "vit" (Qwen2.5-VL-ViT/vit.safetensors, default) or "lance" (the
    vit_model.* tensors of model.safetensors). vae_tiling: spatially tiled VAE encode/decode (less memory,
    pixels differ slightly from untiled; off as in the reference). compile: denoising steps run their decoder
    stack through torch.compile (one compilation per request layout; off by default until measured on a GPU;
    falls back to eager with one log line where compilation is unavailable). defer_placement (stream, auto, fp8):
    the weights a plan keeps on the device go there at the first call that needs them, not during the load (a
    host that makes room on the device first); `pipe.session.offload_weights()` takes them off again."""
    return LancePipeline(load_session(root, variant=variant, dtype=dtype, device=device, attention=attention,
                                      operations=operations, memory=memory, vit_weights=vit_weights,
                                      vae_tiling=vae_tiling, weights_device=weights_device, vram_budget=vram_budget,
                                      fp8=fp8, compile=compile, defer_placement=defer_placement))
