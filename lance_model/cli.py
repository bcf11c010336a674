"""Command line: `python -m lance_model <task> ...` writes PNG/MP4 (generation) or prints text (understanding)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import LanceError
from .io.writers import save_frames
from .nn.checkpoint import LANCE_FOLDERS

DEFAULT_TINY = Path(__file__).resolve().parents[1] / "tests" / "golden" / "checkpoint"


def default_model() -> str:
    return os.environ.get("LANCE_MODEL") or str(DEFAULT_TINY)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lance_model", description="Run ByteDance Lance tasks.")
    parser.add_argument("--model", default=default_model(),
                        help="release folder (Lance_3B[_Video]/, Qwen2.5-VL-ViT/, Wan2.2_VAE.pth); default $LANCE_MODEL or the tiny test checkpoint")
    parser.add_argument("--variant", default="auto", choices=["auto", "image", "video"],
                        help="weights: auto = Lance_3B_Video for video tasks when present, else Lance_3B")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash"])
    parser.add_argument("--memory", default="resident", choices=["resident", "offload"])
    parser.add_argument("--vae-tiling", action="store_true", help="tiled VAE decode/encode (less memory)")
    tasks = parser.add_subparsers(dest="task", required=True)

    def generation(name, help_text, media=None, text="prompt", video=False):
        sub = tasks.add_parser(name, help=help_text)
        sub.add_argument(f"--{text}", required=True)
        if media:
            sub.add_argument(f"--{media}", required=True)
        if name in ("t2i", "t2v", "i2v"):
            sub.add_argument("--width", type=int, default=848 if video else 768)
            sub.add_argument("--height", type=int, default=480 if video else 768)
        if video and name != "video-edit":
            sub.add_argument("--frames", type=int, default=61)
        if name in ("i2v", "edit", "video-edit"):
            sub.add_argument("--resolution", default="video_480p" if video else "image_768res")
        sub.add_argument("--steps", type=int, default=30)
        sub.add_argument("--shift", type=float, default=3.5)
        sub.add_argument("--cfg", type=float, default=4.0)
        sub.add_argument("--seed", type=int, default=42)
        sub.add_argument("--batch", type=int, default=1)
        sub.add_argument("--fps", type=float, default=12.0, help="frame rate of the written MP4")
        sub.add_argument("--out", default=f"out/{name}")
        return sub

    generation("t2i", "text to image")
    generation("t2v", "text to video", video=True)
    generation("i2v", "image to video", media="image", video=True)
    generation("edit", "edit an image", media="image", text="instruction")
    generation("video-edit", "edit a video", media="video", text="instruction", video=True)
    understand = tasks.add_parser("understand", help="answer a question about an image or video")
    understand.add_argument("--media", required=True)
    understand.add_argument("--question", default="")
    understand.add_argument("--instruction", default=None)
    understand.add_argument("--max-new-tokens", type=int, default=256)
    enhance = tasks.add_parser("enhance", help="rewrite a short prompt into a detailed one")
    enhance.add_argument("--prompt", required=True)
    enhance.add_argument("--target", default="image", choices=["image", "video"])
    return parser


VIDEO_TASKS = ("t2v", "i2v", "video-edit")


def pick_variant(model: str, requested: str, task: str) -> str:
    """auto: the video weights (Lance_3B_Video) for video tasks when the folder has them, else the image weights
    (the reference's per-task choice)."""
    if requested != "auto":
        return requested
    wanted = "video" if task in VIDEO_TASKS else "image"
    folder = LANCE_FOLDERS[1] if wanted == "video" else LANCE_FOLDERS[0]
    return wanted if (Path(model).expanduser() / folder).is_dir() else "auto"


def progress(step: int, total: int, _x0) -> None:
    print(f"  step {step + 1}/{total}", file=sys.stderr, flush=True)


def run(args) -> int:
    from .pipeline import load_lance

    started = time.perf_counter()
    pipe = load_lance(args.model, variant=pick_variant(args.model, args.variant, args.task), dtype=args.dtype, device=args.device,
                      attention=args.attention, memory=args.memory, vae_tiling=args.vae_tiling)
    print(f"loaded {pipe.model_id} ({pipe.dtype}, {pipe.device}) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if args.task == "understand":
        result = pipe.understand(args.media, args.question, instruction=args.instruction,
                                 max_new_tokens=args.max_new_tokens)
        print(result.text)
        return 0
    if args.task == "enhance":
        print(pipe.enhance_prompt(args.prompt, target=args.target))
        return 0
    options = dict(steps=args.steps, shift=args.shift, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch,
                   on_step=progress)
    started = time.perf_counter()
    if args.task == "t2i":
        result = pipe.text_to_image(args.prompt, width=args.width, height=args.height, **options)
    elif args.task in ("t2v", "i2v"):
        result = pipe.text_to_video(args.prompt, width=args.width, height=args.height, num_frames=args.frames,
                                    start_image=getattr(args, "image", None),
                                    resolution=getattr(args, "resolution", "video_480p"), **options)
    elif args.task == "edit":
        result = pipe.edit_image(args.image, args.instruction, resolution=args.resolution, **options)
    else:
        result = pipe.edit_video(args.video, args.instruction, resolution=args.resolution, **options)
    elapsed = time.perf_counter() - started
    for i, frames in enumerate(result.frames):
        target = Path(args.out if len(result.frames) == 1 else f"{args.out}_{i}")
        print(f"wrote {save_frames(frames, target, args.fps)}  ({tuple(frames.shape)}, {elapsed:.1f}s)")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
