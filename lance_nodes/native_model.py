"""Lance as a core ComfyUI MODEL: a flow `BaseModel` whose diffusion model is the library's `LanceLLM`.

CONDITIONING carries device-free requests (`lance_model.tasks.branches.Branch`: the packed sequence, ViT embeddings,
clean condition latents and which CFG branch) - never KV tensors. The prefix KV cache is built inside the model by
the library's branch engine from the weights as patched for this run (so weight patches / LoRA reach it), once per
run and branch, and dropped when ComfyUI starts or ends a run (`current_patcher`, set by ModelPatcher.pre_run /
cleanup). The engine restores a prefix from the session's prefix store when an earlier run (native or library)
prefilled the same one with the same weight patches.

The same BaseModel holds the pipeline's ViT and VAE, so its ModelPatcher is the one patcher of the loaded
release: the all-in-one nodes load it too (two patchers over one set of weights would drop weight patches).
"""
from __future__ import annotations

import math

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.patcher_extension
import comfy.supported_models_base

from . import compat
from .errors import input_error
from .library import lance_model

COND_KEY = "lance"            # model-cond name carrying the Branch list into the diffusion model
REQUEST_KEY = "lance_request"  # CONDITIONING dict key (set by the Lance Conditioning node)


class LanceConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    # multiplier 1.0: the model's timestep is sigma itself (Lance's t), exact
    sampling_settings = {"shift": 3.5, "multiplier": 1.0}
    latent_format = comfy.latent_formats.Wan22
    # fp16 is left out: Qwen2.5 MLP activations overflow it
    supported_inference_dtypes = [torch.bfloat16, torch.float32]


class CONDLance(comfy.conds.CONDConstant):
    """One chunk's Branch. Chunks of the same target grid batch together; `concat` hands the model the
    list of requests, one per chunk, in the chunks' order."""

    def can_concat(self, other) -> bool:
        return isinstance(other, CONDLance) and other.cond.inputs.target == self.cond.inputs.target

    def concat(self, others) -> list:
        return [self.cond] + [other.cond for other in others]


class LanceDiffusion(torch.nn.Module):
    """The diffusion model core calls: latents [B, 48, t, h, w] + sigma -> velocity of the same shape."""

    def __init__(self, session):
        super().__init__()
        self.llm = session.llm
        self.store = session.prefixes
        # looked up per run: the host connects its weights_version hook after this model is built
        self.engine = lance_model.tasks.branches.BranchEngine(session.llm, self.store, lambda: session.weights_version())
        self.calls = 0  # forwards actually run (EasyCache skips some), for tests and diagnostics

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def reset(self, use_store: bool = True) -> None:
        """Forget the prefix cache; `use_store` False: do not reuse stored prefixes either (the weights may
        change between steps without a new patch version)."""
        self.engine.reset()
        self.engine.store = self.store if use_store else None

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        # routed through DIFFUSION_MODEL wrappers (EasyCache hooks in here); transformer_options stays last
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timestep, context, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, control, transformer_options, **kwargs):
        requests = kwargs.get(COND_KEY)
        if not requests:
            raise input_error("positive/negative: the Lance MODEL needs conditioning from a 'Lance Conditioning' "
                              "node (text-encoder conditioning such as CLIPTextEncode does not apply)")
        self.calls += 1
        request = lance_model.tasks.request
        tokens = request.video_to_tokens(x).contiguous()  # contiguous: a strided view changes bf16 GEMM results
        v = lance_model.tasks.velocity.host_velocity(self.engine, tokens, timestep.reshape(-1), requests)
        b, c, t, h, w = x.shape
        return request.tokens_to_video(v, request.LatentGrid(t, h, w)).to(x.dtype)


class LanceBaseModel(comfy.model_base.BaseModel):
    def __init__(self, session, device=None):
        super().__init__(LanceConfig(dict(LanceConfig.unet_config)), comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = LanceDiffusion(session)
        # the rest of the release, registered once (the LLM is reached through diffusion_model)
        self.lance_vit = session.vit_module
        self.lance_vae = session.vae_module
        self.__dict__["session"] = session  # not a submodule: its LLM/ViT/VAE are already registered above

    # a new sampling run (pre_run) or its end (cleanup): the prefix cache belongs to one run's weights
    @property
    def current_patcher(self):
        return self.__dict__.get("_current_patcher")

    @current_patcher.setter
    def current_patcher(self, patcher) -> None:
        self.__dict__["_current_patcher"] = patcher
        diffusion = self.__dict__.get("_modules", {}).get("diffusion_model")
        if diffusion is not None:
            diffusion.reset()

    def _apply_model(self, *args, **kwargs):
        patcher = self.current_patcher
        if patcher is not None and getattr(patcher, "hook_patches", None):
            # scheduled hook patches may change the weights between steps: the prefix is rebuilt every call
            self.diffusion_model.reset(use_store=False)
        return super()._apply_model(*args, **kwargs)

    def extra_conds(self, **kwargs):
        request = kwargs.get(REQUEST_KEY)
        if request is None:
            raise input_error("positive/negative: the Lance MODEL needs conditioning from a 'Lance Conditioning' "
                              "node (text-encoder conditioning such as CLIPTextEncode does not apply)")
        for key in ("area", "mask"):
            if kwargs.get(key) is not None:
                raise input_error(f"conditioning {key}: Lance generates the whole target at once; area and mask "
                                  f"conditioning cannot apply (remove the ConditioningSetArea/Mask node)")
        return {COND_KEY: CONDLance(request)}

    def process_timestep(self, timestep, **kwargs):
        # the model's time is sigma (Lance's t); exact for the default multiplier 1.0
        return timestep / self.model_sampling.multiplier

    def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):
        # i2v's frozen first frame stays clean (as core's WAN22)
        return latent_image

    def memory_required(self, input_shape, cond_shapes={}):
        """Activation estimate of one step for `input_shape` rows plus the prefix cache already built."""
        cfg = self.diffusion_model.llm.config
        tokens = input_shape[0] * math.prod(input_shape[2:])
        width = 16 * cfg.hidden_size + 4 * cfg.intermediate_size
        dtype_bytes = comfy.model_management.dtype_size(self.get_dtype())
        return tokens * width * dtype_bytes + self.diffusion_model.engine.cache_bytes


def make_patcher(pipe, reload=None):
    """The one ModelPatcher of a loaded release: a core MODEL that the all-in-one nodes load as well. `reload`
    (a zero-argument callable loading the same pipeline again) becomes core's reload factory."""
    factory = None if reload is None else (lambda: LanceBaseModel(reload().session))
    return compat.model_patcher(LanceBaseModel(pipe.session), reload=factory)


def is_lance_patcher(patcher) -> bool:
    return isinstance(getattr(patcher, "model", None), LanceBaseModel)


def conditioning(branch) -> list:
    """A CONDITIONING list for one Branch. c[0] is a small placeholder tensor so that core conditioning
    nodes that read it keep working; Lance reads only the request."""
    return [[torch.zeros(1, 1, 1), {REQUEST_KEY: branch}]]


def request_of(cond, what: str = "positive"):
    """The Branch of a Lance CONDITIONING (first entry)."""
    try:
        branch = cond[0][1][REQUEST_KEY]
    except (TypeError, IndexError, KeyError):
        raise input_error(f"{what}: expected CONDITIONING from a 'Lance Conditioning' node") from None
    return branch
