"""The Lance nodes (ComfyUI V3 schema): each a schema and a short `execute` that checks the node's inputs and
calls one task method of the loaded pipeline (through runtime.py for progress, previews and interrupt).

Widget order is part of the released contract (UI workflows store widget values by position):
tests/test_nodes_schema.py freezes it. Append new inputs at the end only.
"""
from __future__ import annotations

from . import compat, errors, runtime
from .compat import io, ui
from .errors import input_error, node_errors
from .library import lance_model

CATEGORY = "Lance"

LanceModelType = io.Custom("LANCE_MODEL")
LanceContextType = io.Custom("LANCE_CONTEXT")

IMAGE_RESOLUTIONS = ["image_256res", "image_512res", "image_768res"]
VIDEO_RESOLUTIONS = ["video_192p", "video_360p", "video_480p"]
CFG_RENORM = ["global", "channel", "none"]
SEED_MAX = 0xFFFFFFFFFFFFFFFF
SIZE_STEP = 16
MAX_SIZE = 1024         # 64 latent positions x 16 px: the model's position table (lance_model LanceConstants)
MAX_FRAMES = 121        # 31 latent frames (LanceConstants.max_num_frames)


# ---------------------------------------------------------------- shared input groups (order = contract)
def _model_input():
    return LanceModelType.Input("model", display_name="Model", tooltip="The model from a Lance Loader node.")


def _context_input():
    return LanceContextType.Input(
        "context", display_name="Context", optional=True,
        tooltip="Conversation so far (from another Lance node): multi-turn edits, understand -> edit chains. "
                "Leave unconnected to start a new conversation.")


def _negative_prompt_input():
    return io.String.Input(
        "negative_prompt", display_name="Negative prompt", optional=True, multiline=True, default="",
        tooltip="What to steer away from (guidance pushes from it instead of from the prompt-less branch). "
                "Empty = the official guidance. For edits, naming what must not change helps keep it.")


def _size_inputs(what: str, width: int, height: int):
    return [io.Int.Input(name, display_name=name.capitalize(), default=default, min=64, max=MAX_SIZE, step=SIZE_STEP,
                         tooltip=f"{what} {name} in pixels (a multiple of {SIZE_STEP}).")
            for name, default in (("width", width), ("height", height))]


def _image_cfg_input():
    return io.Float.Input(
        "image_cfg_scale", display_name="Image CFG scale", optional=True, default=1.0, min=0.0, max=20.0, step=0.05,
        tooltip="Image guidance for edits: above 1 keeps the result closer to the source, below 1 lets it change "
                "more. 1 = off (the official guidance); other values add a third model pass per guided step.")


def _seed_stride_input():
    return io.Int.Input(
        "seed_stride", display_name="Seed stride", optional=True, default=1, min=1, max=SEED_MAX, step=1,
        tooltip="Sample i of a batch uses seed + i x stride. Leave at 1 on one machine; with ComfyUI-Distributed "
                "set it to the number of machines, so that no two machines draw the same sample.")


def _sampling_inputs(steps: int = 30):
    return [
        io.Int.Input("steps", display_name="Steps", default=steps, min=1, max=200, step=1,
                     tooltip="Denoising steps: more take longer and usually refine detail."),
        io.Float.Input("shift", display_name="Schedule shift", default=3.5, min=0.1, max=20.0, step=0.05,
                       tooltip="Timestep shift of the flow schedule: higher values spend more steps near noise "
                               "(overall layout), lower values near the end (fine detail)."),
        io.Float.Input("cfg_scale", display_name="CFG scale", default=4.0, min=1.0, max=20.0, step=0.1,
                       tooltip="Text classifier-free guidance scale: how strongly the result follows the prompt "
                               "(1.0 = no guidance, one model pass per step instead of two)."),
        io.Float.Input("cfg_interval_start", display_name="CFG interval start", default=0.4, min=0.0, max=1.0,
                       step=0.01,
                       tooltip="Guidance is applied while the timestep t is in (start, end]; t runs from 1 (pure "
                               "noise) to 0 (the finished sample)."),
        io.Float.Input("cfg_interval_end", display_name="CFG interval end", default=1.0, min=0.0, max=1.0,
                       step=0.01, tooltip="Upper end of the guidance interval (see CFG interval start); not below "
                                          "the start."),
        io.Combo.Input("cfg_renorm", display_name="CFG renorm", options=CFG_RENORM, default="global",
                       tooltip="Scales the guided velocity down so its norm does not exceed the unguided one: over "
                               "the whole sample (global), per token (channel), or not at all (none)."),
        io.Float.Input("cfg_renorm_min", display_name="CFG renorm min", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Lowest factor the renormalisation may scale the guided velocity by (0 = no limit)."),
        io.Int.Input("seed", display_name="Seed", default=42, min=0, max=SEED_MAX, step=1,
                     control_after_generate=True,
                     tooltip="Noise seed: the same seed and settings give the same result. Sample i of a batch "
                             "uses seed + i (x the seed stride)."),
        io.Int.Input("batch_size", display_name="Batch size", default=1, min=1, max=16, step=1,
                     tooltip="How many samples to generate in one run."),
    ]


def _settings(model, context, sampling: dict, **extra):
    """The common start of every sampling node: the checked model and the library's GenerationSettings from the
    sampling widgets (`_sampling_inputs`) and the node's extra options, validated by the library (its errors name
    each option)."""
    model = runtime.check_model(model)
    start, end = sampling.pop("cfg_interval_start"), sampling.pop("cfg_interval_end")
    settings = lance_model.GenerationSettings(cfg_interval=(start, end), context=runtime.check_context(context, model),
                                              **sampling, **extra)
    settings.validate()
    return model, settings


def _image_outputs():
    return [io.Latent.Output(display_name="latent", tooltip="Wan2.2-layout LATENT (core VAEDecode with the Wan2.2 VAE decodes it)."),
            io.Image.Output(display_name="image")]


def _video_outputs():
    return [io.Latent.Output(display_name="latent", tooltip="Wan2.2-layout LATENT (core VAEDecode with the Wan2.2 VAE decodes it)."),
            io.Image.Output(display_name="frames", tooltip="All frames of all samples as an IMAGE batch.")] \
        + compat.video_outputs()


def _source_fps_input():
    return io.Float.Input(
        "source_fps", display_name="Source frame rate", default=0.0, min=0.0, max=240.0, step=0.001, optional=True,
        tooltip="Frame rate of the input video (e.g. from Get Video Components). When set, frames are sampled as "
                "Lance was trained: about 12 fps over at most 6 s. 0 = use the frames as given.")


def _context_output():
    return LanceContextType.Output(display_name="context", tooltip="The conversation with this turn appended.")


def _video_result(result, fps: float) -> list:
    frames = runtime.frames_to_image(result.frames)
    values = [runtime.latent_output(result), frames]
    if compat.HAS_VIDEO:
        first = result.frames[0] if result.frames.ndim == 5 else result.frames
        values.append(compat.make_video(runtime.frames_to_image(first), fps))
    return values


# ---------------------------------------------------------------- loader
class LanceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceLoader", display_name="Lance Loader", category=CATEGORY,
            description="Loads a Lance release folder from models/lance/. The model is loaded once and shared by "
                        "every Lance node and queue run; ComfyUI manages its memory.",
            inputs=[
                io.Combo.Input("model_name", display_name="Model folder", options=compat.list_model_entries(),
                               tooltip="A release folder in models/lance/ (Lance_3B or Lance_3B_Video, "
                                       "Qwen2.5-VL-ViT, Wan2.2_VAE.pth)."),
                io.Combo.Input("variant", display_name="Variant", options=["auto", "image", "video"], default="auto",
                               tooltip="Which Lance weights of the folder: image (Lance_3B) or video "
                                       "(Lance_3B_Video); auto prefers image."),
                io.Combo.Input("dtype", display_name="Precision", options=["auto", "bf16", "fp32"], default="auto",
                               tooltip="Weight and compute precision. auto: bf16 on GPUs that support it, fp32 "
                                       "otherwise."),
                io.Combo.Input("attention", display_name="Attention", options=["auto", "sdpa", "flash"], default="auto",
                               tooltip="Attention backend; flash needs the flash-attn package."),
                io.Combo.Input("memory_mode", display_name="Memory mode", options=list(runtime.LOADER_MEMORY_MODES),
                               default="resident",
                               tooltip="resident: keep the weights on the GPU between runs; ComfyUI manages them "
                                       "(on a small card it loads what fits). offload: move them back to RAM after "
                                       "each node. dynamic: keep them in RAM and let ComfyUI's Dynamic VRAM stream "
                                       "them (newer ComfyUI on a GPU). auto: Lance picks the fastest placement that "
                                       "fits your card, the same pixels as resident (16 GB: ViT and VAE visit the "
                                       "GPU; 12 GB: the understanding expert streams from RAM; 8 GB: both experts "
                                       "stream). stream: both experts always stream from RAM (smallest GPU use, "
                                       "slowest). The plan chosen is shown on this node. In every mode ComfyUI "
                                       "unloads Lance when another model needs the room."),
                io.Combo.Input("weight_dtype", display_name="Weight dtype", options=list(runtime.WEIGHT_DTYPES),
                               default="default", optional=True,   # appended: saved workflows lack it
                               tooltip="default: the release's precision. fp8_e4m3fn stores the understanding "
                                       "expert (or both experts) in 8 bits: less memory, but it CHANGES THE PICTURE "
                                       "and has not been validated on the release's weights. Only with memory_mode "
                                       "auto or stream."),
            ],
            outputs=[LanceModelType.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, model_name, variant="auto", **_):
        """At queue time, on every host: a missing model folder is refused before anything runs (a remote worker
        without it would otherwise fail only when its turn comes, after the master reported success)."""
        try:
            lance_model.nn.checkpoint.resolve_release(runtime.resolve_model_path(model_name), variant)
        except (errors.CheckpointError, lance_model.CheckpointError) as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, model_name, variant="auto", **_):
        # a replaced weight file makes ComfyUI run the loader again, which then reloads it
        return runtime.model_files_fingerprint(model_name, variant)

    @classmethod
    @node_errors
    def execute(cls, model_name, variant, dtype, attention, memory_mode, weight_dtype="default"):
        model = runtime.get_model(model_name, variant, dtype, attention, memory_mode, weight_dtype)
        return io.NodeOutput(model, ui=ui.PreviewText(runtime.plan_text(model)))


# ---------------------------------------------------------------- generation
class LanceT2I(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceT2I", display_name="Lance Text to Image", category=CATEGORY,
            description="Generates images from a text prompt.",
            inputs=[
                _model_input(),
                io.String.Input("prompt", display_name="Prompt", multiline=True,
                                default="A red fox in a snowy forest at dawn, photorealistic.",
                                tooltip="What the image should show."),
                *_size_inputs("Image", 768, 768),
                *_sampling_inputs(30),
                _context_input(),
                _negative_prompt_input(),
                _seed_stride_input(),
            ],
            outputs=[*_image_outputs(), _context_output()],
        )

    @classmethod
    @node_errors
    def execute(cls, model, prompt, width, height, context=None, negative_prompt="", seed_stride=1, **sampling):
        model, settings = _settings(model, context, sampling, negative_prompt=negative_prompt or "",
                                    seed_stride=seed_stride)
        result = runtime.generate(model, model.pipe.text_to_image, prompt, width=width, height=height,
                                  settings=settings, to_fit="lower width/height or batch_size")
        return io.NodeOutput(runtime.latent_output(result), runtime.frames_to_image(result.frames), result.context)


class LanceT2V(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceT2V", display_name="Lance Text to Video", category=CATEGORY,
            description="Generates a video from a text prompt; with a start image connected it animates that "
                        "image (image to video).",
            inputs=[
                _model_input(),
                io.String.Input("prompt", display_name="Prompt", multiline=True,
                                default="A small boat sails across a calm lake at sunset.",
                                tooltip="What the video should show (and how the camera moves)."),
                *_size_inputs("Video", 848, 480),
                io.Int.Input("num_frames", display_name="Frames", default=61, min=1, max=MAX_FRAMES, step=4,
                             tooltip="Number of frames, 4k+1 (1, 5, ..., 61, ...); 61 frames at 12 fps are about 5 s."),
                io.Combo.Input("resolution", display_name="Start image resolution", options=VIDEO_RESOLUTIONS,
                               default="video_480p", tooltip="Resolution preset used to prepare the start image."),
                io.Float.Input("fps", display_name="Frame rate", default=12.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frame rate of the VIDEO output (Lance saves at 12)."),
                *_sampling_inputs(30),
                io.Image.Input("start_image", display_name="Start image", optional=True,
                               tooltip="Optional first frame: image to video."),
                _context_input(),
                _negative_prompt_input(),
                _seed_stride_input(),
            ],
            outputs=[*_video_outputs(), _context_output()],
        )

    @classmethod
    @node_errors
    def execute(cls, model, prompt, width, height, num_frames, resolution, fps, start_image=None, context=None,
                negative_prompt="", seed_stride=1, **sampling):
        model, settings = _settings(model, context, sampling, negative_prompt=negative_prompt or "",
                                    seed_stride=seed_stride)
        runtime.check_finite(fps=fps)
        if start_image is not None:
            start_image = runtime.check_image(start_image, "start_image")
        result = runtime.generate(model, model.pipe.text_to_video, prompt, width=width, height=height,
                                  num_frames=num_frames, start_image=start_image, resolution=resolution,
                                  settings=settings, to_fit="lower width/height, num_frames or batch_size")
        return io.NodeOutput(*_video_result(result, fps), result.context)


class LanceEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceEdit", display_name="Lance Image Edit", category=CATEGORY,
            description="Edits an image following an instruction. Chain the context output into another Lance "
                        "Edit for multi-turn editing.",
            inputs=[
                _model_input(),
                io.Image.Input("image", display_name="Image", tooltip="One image (an IMAGE batch of 1)."),
                io.String.Input("instruction", display_name="Instruction", multiline=True,
                                default="Make the sky a warm sunset orange.",
                                tooltip="What to change in the image."),
                io.Combo.Input("resolution", display_name="Resolution", options=IMAGE_RESOLUTIONS,
                               default="image_768res", tooltip="Resolution preset the image is resized to."),
                *_sampling_inputs(30),
                _context_input(),
                _negative_prompt_input(),
                _image_cfg_input(),
                _seed_stride_input(),
            ],
            outputs=[*_image_outputs(), _context_output()],
        )

    @classmethod
    @node_errors
    def execute(cls, model, image, instruction, resolution, context=None, negative_prompt="", image_cfg_scale=1.0,
                seed_stride=1, **sampling):
        model, settings = _settings(model, context, sampling, negative_prompt=negative_prompt or "",
                                    image_cfg_scale=image_cfg_scale, seed_stride=seed_stride)
        image = runtime.check_image(image, "image")
        result = runtime.generate(model, model.pipe.edit_image, image, instruction, resolution=resolution,
                                  settings=settings, to_fit="pick a smaller resolution or batch_size")
        return io.NodeOutput(runtime.latent_output(result), runtime.frames_to_image(result.frames), result.context)


class LanceVideoEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceVideoEdit", display_name="Lance Video Edit", category=CATEGORY,
            description="Edits a video (an IMAGE batch of frames) following an instruction.",
            inputs=[
                _model_input(),
                io.Image.Input("video", display_name="Video frames",
                               tooltip="The video's frames as an IMAGE batch (e.g. from Get Video Components)."),
                io.String.Input("instruction", display_name="Instruction", multiline=True,
                                default="Change the car color to red.", tooltip="What to change in the video."),
                io.Combo.Input("resolution", display_name="Resolution", options=VIDEO_RESOLUTIONS,
                               default="video_480p", tooltip="Resolution preset the video is resized to."),
                io.Float.Input("fps", display_name="Frame rate", default=12.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frame rate of the VIDEO output (Lance saves at 12)."),
                *_sampling_inputs(30),
                _context_input(),
                _source_fps_input(),
                _negative_prompt_input(),
                _image_cfg_input(),
                _seed_stride_input(),
            ],
            outputs=[*_video_outputs(), _context_output()],
        )

    @classmethod
    @node_errors
    def execute(cls, model, video, instruction, resolution, fps, context=None, source_fps=0.0, negative_prompt="",
                image_cfg_scale=1.0, seed_stride=1, **sampling):
        model, settings = _settings(model, context, sampling, negative_prompt=negative_prompt or "",
                                    image_cfg_scale=image_cfg_scale, seed_stride=seed_stride)
        runtime.check_finite(fps=fps, source_fps=source_fps)
        video = runtime.check_video(video, "video")
        result = runtime.generate(model, model.pipe.edit_video, video, instruction, resolution=resolution,
                                  fps=float(source_fps) or None, settings=settings,
                                  to_fit="pick a smaller resolution or batch_size, or edit fewer frames")
        return io.NodeOutput(*_video_result(result, fps), result.context)


# ---------------------------------------------------------------- understanding and text
def _sampling_options(temperature: float, top_p: float, seed: int):
    """None = greedy decoding; otherwise the library's SamplingOptions."""
    if temperature <= 0:
        return None
    return lance_model.SamplingOptions(temperature=float(temperature), top_p=float(top_p), seed=int(seed))


class LanceUnderstand(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceUnderstand", display_name="Lance Understand (image / video)", category=CATEGORY,
            description="Answers a question about an image or a video. The answer streams onto the node; the "
                        "context output continues the conversation (e.g. into Lance Image Edit).",
            inputs=[
                _model_input(),
                io.String.Input("question", display_name="Question", multiline=True,
                                default="Describe this image in detail.",
                                tooltip="What to ask about the image or video."),
                io.String.Input("instruction", display_name="System instruction", multiline=True, default="",
                                tooltip="Optional system-style instruction (empty = the model's default)."),
                io.Combo.Input("resolution", display_name="Resolution",
                               options=["auto", *IMAGE_RESOLUTIONS, *VIDEO_RESOLUTIONS], default="auto",
                               tooltip="Resolution preset for the media; auto picks one for images / videos."),
                io.Int.Input("max_new_tokens", display_name="Max new tokens", default=256, min=1, max=4096, step=1,
                             tooltip="Longest answer, in tokens."),
                io.Float.Input("temperature", display_name="Temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Sampling temperature; 0 = greedy decoding (always the most likely token)."),
                io.Float.Input("top_p", display_name="Top-p", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Nucleus sampling: keep the most likely tokens whose probabilities add up to "
                                       "this (used when temperature > 0); 0 keeps only the most likely token."),
                io.Int.Input("seed", display_name="Seed", default=0, min=0, max=SEED_MAX, step=1,
                             control_after_generate=True, tooltip="Sampling seed (used when temperature > 0)."),
                io.Image.Input("image", display_name="Image", optional=True,
                               tooltip="One image (connect either image or video)."),
                io.Image.Input("video", display_name="Video frames", optional=True,
                               tooltip="Video frames as an IMAGE batch."),
                _context_input(),
                _source_fps_input(),
            ],
            outputs=[io.String.Output(display_name="text"), _context_output()],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    @node_errors
    def execute(cls, model, question, instruction, resolution, max_new_tokens, temperature, top_p, seed,
                image=None, video=None, context=None, source_fps=0.0):
        model = runtime.check_model(model)
        context = runtime.check_context(context, model)
        runtime.check_finite(temperature=temperature, top_p=top_p, source_fps=source_fps)
        if image is not None and video is not None:
            raise input_error("image and video are both connected: connect one of them")
        if image is not None:
            media = runtime.check_image(image, "image")
        elif video is not None:
            media = runtime.check_video(video, "video")
        elif context is not None:
            media = None  # a follow-up question about media already in the conversation
        else:
            raise input_error("connect an image or a video (or a context that already holds one)")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def on_token(text_so_far: str) -> None:
            compat.send_text(node_id, text_so_far)

        result = runtime.call(model, model.pipe.understand, media, question, instruction=instruction or None,
                              resolution=None if resolution == "auto" else resolution,
                              max_new_tokens=max_new_tokens, sampling=_sampling_options(temperature, top_p, seed),
                              on_token=on_token, context=context, fps=float(source_fps) or None,
                              to_fit="ask for fewer max_new_tokens or pick a smaller resolution")
        return io.NodeOutput(result.text, result.context, ui=ui.PreviewText(result.text))


class LancePromptEnhance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LancePromptEnhance", display_name="Lance Prompt Enhance", category=CATEGORY,
            description="Rewrites a short prompt into a detailed one with Lance itself.",
            inputs=[
                _model_input(),
                io.String.Input("prompt", display_name="Prompt", multiline=True, default="a cat on a windowsill",
                                tooltip="A short prompt to expand."),
                io.Combo.Input("target", display_name="Target", options=["image", "video"], default="image",
                               tooltip="Write the detailed prompt for image or for video generation."),
                io.Int.Input("max_new_tokens", display_name="Max new tokens", default=256, min=1, max=4096, step=1,
                             tooltip="Longest rewritten prompt, in tokens."),
            ],
            outputs=[io.String.Output(display_name="prompt")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, prompt, target, max_new_tokens):
        model = runtime.check_model(model)
        if not prompt or not prompt.strip():
            raise input_error("prompt is empty: write a short prompt to enhance")
        text = runtime.call(model, model.pipe.enhance_prompt, prompt, target=target, max_new_tokens=max_new_tokens,
                            to_fit="ask for fewer max_new_tokens")
        return io.NodeOutput(text, ui=ui.PreviewText(text))


# ---------------------------------------------------------------- helpers
class LanceDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceDecode", display_name="Lance Decode Latent", category=CATEGORY,
            description="Decodes a Wan2.2-layout LATENT with Lance's own VAE into an IMAGE batch (video frames "
                        "flattened).",
            inputs=[_model_input(),
                    io.Latent.Input("samples", display_name="Latent",
                                    tooltip="A Wan2.2-layout LATENT (48 channels) from a Lance node.")],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    @node_errors
    def execute(cls, model, samples):
        model = runtime.check_model(model)
        frames = runtime.decode(model, runtime.check_latent(samples, "samples"))
        return io.NodeOutput(runtime.frames_to_image(frames))


class LanceContextView(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="LanceContextView", display_name="Lance Context View", category=CATEGORY,
            description="Shows the turns of a Lance conversation context as text.",
            inputs=[LanceContextType.Input("context", display_name="Context",
                                           tooltip="A conversation from a Lance node's context output.")],
            outputs=[io.String.Output(display_name="text")],
            is_output_node=True,
        )

    @classmethod
    @node_errors
    def execute(cls, context):
        text = runtime.describe_context(context)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [LanceLoader, LanceT2I, LanceT2V, LanceEdit, LanceVideoEdit, LanceUnderstand, LancePromptEnhance,
         LanceDecode, LanceContextView]
