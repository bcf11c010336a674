"""Per-phase timings of every task on the random "mid" release (bench/random_release.py), the size the
performance issue compares against the official code: load, prefill, per CFG step, VAE encode/decode, per
generated token, peak RSS. 10 steps, CFG 4, shift 3.5, interval (0.4, 1], fp32 on CPU.

    python bench/bench_mid.py [--tasks t2i,image_edit,video_edit,t2v,x2t] [--size 256] [--repeat 2]

Each figure is the minimum and median of --repeat runs (this machine varies up to 1.7x between identical runs).
Per step = (time of a 10-step run - time of a 1-step run) / 9; prefill = the 1-step run minus one step.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_release import mid_release  # noqa: E402
from lance_model import load_lance  # noqa: E402

STEPS = 10
GUIDANCE = dict(cfg_scale=4.0, shift=3.5, cfg_interval=(0.4, 1.0), decode=False)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def line(label: str, figures: tuple[float, float], unit: str = "s") -> None:
    print(f"  {label:<28} min {figures[0]:8.3f} {unit}   median {figures[1]:8.3f} {unit}", flush=True)


def sampling_phases(pipe, run, repeat: int) -> None:
    """run(steps) samples with that many steps; prints prefill and per step (every run prefills and encodes: the
    prefix and encoding stores are cleared first), then a repeated request that reuses what they stored."""
    fresh = lambda steps: (pipe.prefixes.clear(), pipe.encodings.clear(), run(steps))
    one = measure(lambda: fresh(1), repeat)
    full = measure(lambda: fresh(STEPS), repeat)
    step = tuple((f - o) / (STEPS - 1) for f, o in zip(full, one))
    line("prefill + 1 step", one)
    line("per CFG step", step)
    line(f"sampling, {STEPS} steps", full)
    run(1)
    reused = measure(lambda: run(1), repeat)
    line("same request again, 1 step", reused)
    print(f"  stored prefixes and encodings save {one[0] - reused[0]:.3f} s (min) / {one[1] - reused[1]:.3f} s (median) per run")


def bench_t2i(pipe, size: int, repeat: int) -> None:
    print(f"t2i {size}x{size}")
    run = lambda steps: pipe.text_to_image("a red fox in the snow", width=size, height=size, steps=steps, **GUIDANCE)
    sampling_phases(pipe, run, repeat)
    latents = run(1).latents
    line("VAE decode", measure(lambda: pipe.vae.decode(latents), repeat))


def bench_edit(pipe, size: int, repeat: int) -> None:
    print(f"image_edit {size}x{size}")
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    resolution = {256: "image_256res", 512: "image_512res"}.get(size, "image_768res")
    run = lambda steps: pipe.edit_image(image, "make the sky red", resolution=resolution, steps=steps, **GUIDANCE)
    sampling_phases(pipe, run, repeat)
    pixels = torch.rand(1, 3, 1, size, size) * 2 - 1
    line("VAE encode", measure(lambda: pipe.vae.encode(pixels), repeat))


def bench_video_edit(pipe, size: int, repeat: int, frames: int = 5) -> None:
    print(f"video_edit {size}x{size}x{frames}")
    video = torch.rand(frames, size, size, 3, generator=torch.Generator().manual_seed(0))
    run = lambda steps: pipe.edit_video(video, "make the sky red", resolution="video_192p", fps=8.0, steps=steps,
                                        **GUIDANCE)
    sampling_phases(pipe, run, repeat)


def bench_t2v(pipe, size: int, repeat: int, frames: int = 5) -> None:
    print(f"t2v {size}x{size}x{frames}")
    run = lambda steps: pipe.text_to_video("a boat on a lake", width=size, height=size, num_frames=frames,
                                           steps=steps, **GUIDANCE)
    sampling_phases(pipe, run, repeat)
    latents = run(1).latents
    line("VAE decode", measure(lambda: pipe.vae.decode(latents), repeat))


def bench_x2t(pipe, size: int, repeat: int, tokens: int = 64) -> None:
    print(f"x2t image {size}x{size}, up to {tokens} tokens")
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    counts = []

    def run(limit):
        counts.append(len(pipe.understand(image, "Describe the image.", max_new_tokens=limit).token_ids))
    one = measure(lambda: run(1), repeat)
    full = measure(lambda: run(tokens), repeat)
    made = max(counts)   # random weights may stop at <|im_end|> before the limit
    line("prefill + 1 token", one)
    if made > 1:
        line(f"per token ({made} tokens)", tuple((f - o) / (made - 1) for f, o in zip(full, one)))


TASKS = {"t2i": bench_t2i, "image_edit": bench_edit, "video_edit": bench_video_edit, "t2v": bench_t2v,
         "x2t": bench_x2t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    root = mid_release()
    print(f"mid release {root}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    start = time.perf_counter()
    pipe = load_lance(root, dtype="fp32", device="cpu")
    print(f"load {time.perf_counter() - start:.2f} s, peak RSS {peak_rss_gb():.2f} GB")
    with torch.inference_mode():
        for name in args.tasks.split(","):
            TASKS[name](pipe, args.size, args.repeat)
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
