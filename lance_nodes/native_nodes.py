"""Opt-in nodes that run Lance through ComfyUI's own sampling (KSampler / SamplerCustomAdvanced, EasyCache,
LoRA via ModelPatcher...). The all-in-one nodes (LanceT2I, LanceEdit, ...) stay the product's reference path.

    Lance Loader -> Lance Model -> [Lance Guidance] -> MODEL ----------------------------\\
    Lance Loader -> Lance Conditioning -> positive, negative, LATENT -> KSampler (euler, lance_flow)
                                                                      or SamplerCustomAdvanced(Lance Noise,
                                                                      CFGGuider, euler, Lance Scheduler)
    -> core VAEDecode (the VAE output of Lance Model) or Lance Decode
"""
from __future__ import annotations

import torch

from . import runtime
from .compat import io, schema
from .errors import input_error, node_errors
from .library import lance_model
from .native_model import conditioning, is_lance_patcher, request_of
from .native_sampling import LanceNoise, apply_guidance, edit_guider, guidance_options, lance_flow_sigmas, \
    register_scheduler
from .native_vae import LanceCoreVAE
from .nodes import CATEGORY, CFG_RENORM, IMAGE_RESOLUTIONS, MAX_FRAMES, MAX_SIZE, SEED_MAX, SIZE_STEP, \
    VIDEO_RESOLUTIONS, LanceModelType
from .placed_patcher import is_placed_patcher

NATIVE_CATEGORY = f"{CATEGORY}/native"
TASKS = ["t2i", "t2v", "image_edit", "video_edit"]

register_scheduler()


def native_patcher(model) -> object:
    """The loaded release's one ModelPatcher, as a core MODEL."""
    model = runtime.check_model(model)
    if is_placed_patcher(model.patcher):
        raise input_error(f"model: the native (core MODEL) path needs memory_mode 'resident' or 'dynamic' on the "
                          f"Lance Loader; {model.memory_mode!r} places the weights itself, which ComfyUI's sampler "
                          f"memory management does not expect. ComfyUI still offloads a resident model under memory "
                          f"pressure (partial loads on small cards).")
    if not is_lance_patcher(model.patcher):
        raise input_error("model: this LANCE_MODEL has no core MODEL patcher (reload it with the Lance Loader)")
    return model.patcher


class LanceModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="LanceModel", display_name="Lance Model", category=NATIVE_CATEGORY,
            description="The loaded Lance as a core MODEL for KSampler / SamplerCustomAdvanced, LoRA loaders, "
                        "EasyCache..., and its Wan2.2 VAE as a core VAE for VAE Decode / VAE Encode. Both share "
                        "the weights (and one ModelPatcher) with the all-in-one Lance nodes.",
            inputs=[LanceModelType.Input("model", tooltip="The model from a Lance Loader node (memory_mode resident).")],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.Vae.Output(display_name="VAE", tooltip="The release's Wan2.2 VAE (no file in models/vae "
                                                               "needed); decodes exactly as Lance Decode.")],
        )

    @classmethod
    @node_errors
    def execute(cls, model):
        patcher = native_patcher(model)
        return io.NodeOutput(patcher, LanceCoreVAE(model))


def build_conditioning(pipe, inputs, batch_size: int = 1):
    """positive / negative / image-negative CONDITIONING and the LATENT to sample for one request. The negative
    is the request's negative prompt when it has one, else its caption-dropped branch (the official
    unconditional); the image-negative (for image CFG on edits) is the negative without the source media."""
    branches = lance_model.tasks.branches.cfg_branches(inputs)
    # without media there is no image branch: the negative stands in (the Lance Edit Guider refuses image CFG)
    positive, negative, image_negative = (conditioning(b) for b in (branches + branches[1:])[:3])
    return positive, negative, empty_latent(pipe, inputs, batch_size), image_negative


def empty_latent(pipe, inputs, batch_size: int) -> dict:
    """Zeros of the target's size (un-normalized Wan2.2 layout); i2v: frame 0 is the start image and a
    noise_mask keeps it clean (core's Wan2.2 image-to-video convention)."""
    grid = inputs.target
    samples = torch.zeros(batch_size, pipe.config.constants.latent_channels, grid.frames, grid.height, grid.width)
    if inputs.first_frame is None:
        return {"samples": samples}
    request = lance_model.tasks.request
    first = pipe.vae.denormalize(request.tokens_to_video(inputs.first_frame[None].float(),
                                                         request.LatentGrid(1, grid.height, grid.width)))
    samples[:, :, :1] = first.cpu()
    mask = torch.ones(batch_size, 1, grid.frames, grid.height, grid.width)
    mask[:, :, :1] = 0.0
    return {"samples": samples, "noise_mask": mask}


class LanceConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="LanceConditioning", display_name="Lance Conditioning", category=NATIVE_CATEGORY,
            description="Turns a prompt (and the image / video to edit or animate) into positive and negative "
                        "CONDITIONING for the Lance MODEL, and the LATENT to sample. An empty negative prompt "
                        "gives the official unconditional branch (the prompt dropped).",
            inputs=[
                LanceModelType.Input("model", tooltip="The model from a Lance Loader node."),
                io.Combo.Input("task", options=TASKS, default="t2i",
                               tooltip="t2i / t2v (with an image: image-to-video) / image_edit / video_edit."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The caption (t2i/t2v) or the edit instruction."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid; empty = the official unconditional branch."),
                io.Int.Input("width", default=768, min=SIZE_STEP, max=MAX_SIZE, step=SIZE_STEP,
                             tooltip="t2i/t2v output width (edits and i2v follow the source's bucket)."),
                io.Int.Input("height", default=768, min=SIZE_STEP, max=MAX_SIZE, step=SIZE_STEP),
                io.Int.Input("num_frames", default=61, min=1, max=MAX_FRAMES, step=4, tooltip="t2v/i2v frames (4k+1)."),
                io.Combo.Input("resolution", options=["auto"] + IMAGE_RESOLUTIONS + VIDEO_RESOLUTIONS, default="auto",
                               tooltip="Bucket of the source image/video (auto: image_768res for image edits, "
                                       "video_480p for video)."),
                io.Int.Input("batch_size", default=1, min=1, max=16, step=1),
                io.Image.Input("image", optional=True, tooltip="image_edit: the image; t2v: the start image (i2v)."),
                io.Image.Input("video", optional=True, tooltip="video_edit: the frames of the video."),
                io.Float.Input("source_fps", optional=True, default=0.0, min=0.0, max=240.0, step=0.01,
                               tooltip="video_edit: the video's frame rate (frames are sampled as in training)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent"),
                     io.Conditioning.Output(display_name="image_negative",
                                            tooltip="Edits: the negative without the source image/video, for "
                                                    "image CFG in the Lance Edit Guider.")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, task, prompt, negative_prompt, width, height, num_frames, resolution, batch_size,
                image=None, video=None, source_fps=None):
        model = runtime.check_model(model)
        if task not in TASKS:
            raise input_error(f"task: expected one of {TASKS}, got {task!r}")
        inputs = prepare_request(model.pipe, task, prompt, negative_prompt, int(width), int(height), int(num_frames),
                                 resolution, image, video, source_fps)
        return io.NodeOutput(*build_conditioning(model.pipe, inputs, int(batch_size)))


def prepare_request(pipe, task, prompt, negative_prompt, width, height, num_frames, resolution, image, video,
                    source_fps):
    """The library's prepare_* for the task (the same request the all-in-one nodes sample)."""
    video_task = task in ("t2v", "video_edit")
    if resolution == "auto":
        resolution = "video_480p" if video_task else "image_768res"
    negative = {"negative_prompt": negative_prompt} if negative_prompt else {}
    if task == "t2i":
        return pipe.prepare_text_to_image(prompt, width, height, **negative)
    if task == "t2v":
        start = runtime.check_image(image, "image") if image is not None else None
        return pipe.prepare_text_to_video(prompt, width, height, num_frames, start_image=start,
                                          resolution=resolution, **negative)
    if task == "image_edit":
        if image is None:
            raise input_error("image: image_edit needs the image to edit")
        return pipe.prepare_edit(runtime.check_image(image, "image"), prompt, video=False, resolution=resolution,
                                 **negative)
    if video is None:
        raise input_error("video: video_edit needs the video frames to edit")
    fps = float(source_fps) if source_fps else None
    return pipe.prepare_edit(runtime.check_video(video, "video"), prompt, video=True, resolution=resolution,
                             fps=fps, **negative)


class LanceScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="LanceScheduler", display_name="Lance Scheduler", category=NATIVE_CATEGORY,
            description="Lance's exact flow timesteps (the 'lance_flow' scheduler) for SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model"), io.Int.Input("steps", default=30, min=1, max=200, step=1)],
            outputs=[io.Sigmas.Output(display_name="SIGMAS")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, steps):
        return io.NodeOutput(lance_flow_sigmas(model.get_model_object("model_sampling"), int(steps)))


class LanceNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="LanceNoise", display_name="Lance Noise", category=NATIVE_CATEGORY,
            description="The official Lance noise for a seed (as LanceT2I draws it). KSampler's own noise for the "
                        "same seed is laid out differently: a different, equally valid sample.",
            inputs=[io.Int.Input("noise_seed", default=42, min=0, max=SEED_MAX, step=1, control_after_generate=True),
                    io.Conditioning.Input("positive", tooltip="The positive output of Lance Conditioning.")],
            outputs=[io.Noise.Output(display_name="NOISE")],
        )

    @classmethod
    @node_errors
    def execute(cls, noise_seed, positive):
        return io.NodeOutput(LanceNoise(noise_seed, request_of(positive)))


def _guidance_rule_inputs() -> list:
    """Lance's CFG interval and renorm (Lance Guidance, Lance Edit Guider)."""
    return [
        io.Float.Input("cfg_interval_start", default=0.4, min=0.0, max=1.0, step=0.01,
                       tooltip="Guidance applies for start < t <= end."),
        io.Float.Input("cfg_interval_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Upper end of the guidance interval; not below the start."),
        io.Combo.Input("cfg_renorm", options=CFG_RENORM, default="global"),
        io.Float.Input("cfg_renorm_min", default=0.0, min=0.0, max=1.0, step=0.01),
    ]


class LanceGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="LanceGuidance", display_name="Lance Guidance", category=NATIVE_CATEGORY,
            description="Lance's CFG rules on a MODEL: guidance only inside the timestep interval (no negative "
                        "forward outside it) and renormalisation of the guided velocity. The scale is the "
                        "sampler's cfg.",
            inputs=[
                io.Model.Input("model"),
                *_guidance_rule_inputs(),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, cfg_interval_start, cfg_interval_end, cfg_renorm, cfg_renorm_min):
        return io.NodeOutput(apply_guidance(model, cfg_interval_start, cfg_interval_end, cfg_renorm, cfg_renorm_min))


class LanceEditGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="LanceEditGuider", display_name="Lance Edit Guider", category=NATIVE_CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced with Lance's text CFG and image CFG for edits "
                        "(v_uu + cfg (v_c - v_u) + image_cfg (v_u - v_uu)), its interval and renorm. Use it with "
                        "the plain Lance Model (no Lance Guidance needed).",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Conditioning.Input("image_negative", tooltip="The image_negative output of Lance Conditioning."),
                io.Float.Input("cfg", default=4.0, min=1.0, max=20.0, step=0.1, tooltip="Text CFG scale."),
                io.Float.Input("image_cfg", default=1.0, min=0.0, max=20.0, step=0.05,
                               tooltip="Image CFG scale: above 1 stays closer to the source; 1 = off."),
                *_guidance_rule_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, positive, negative, image_negative, cfg, image_cfg, cfg_interval_start,
                cfg_interval_end, cfg_renorm, cfg_renorm_min):
        runtime.check_finite(cfg=cfg, image_cfg=image_cfg, cfg_interval_start=cfg_interval_start,
                             cfg_interval_end=cfg_interval_end, cfg_renorm_min=cfg_renorm_min)
        options = guidance_options(cfg, cfg_interval_start, cfg_interval_end, cfg_renorm, cfg_renorm_min, image_cfg)
        return io.NodeOutput(edit_guider(model, positive, negative, image_negative, options))


NATIVE_NODES = [LanceModelNode, LanceConditioning, LanceScheduler, LanceNoiseNode, LanceGuidance, LanceEditGuiderNode]
