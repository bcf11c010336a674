"""This library against the official Lance code, the same work on the same random "mid" release
(bench/random_release.py), in one run: for each repeat and task, the official code then ours, each in a fresh
process (fp32, CPU, --threads threads), so both see the same machine state. Prints min/median of the totals
(prompt to pixels, load excluded), the sampling, the VAE decode, the median CFG step, peak RSS, the ratios, and
the largest difference between the two final latents (same weights, seed and settings: the same numbers).

    python bench/bench_vs_official.py --runner RUNNER --runner-python PYTHON [--tasks t2i,image_edit,t2v,x2t]
                                      [--sizes 256] [--repeat 2] [--threads 2]

RUNNER is a script that runs the official code (commit 4baeee0) on CPU and prints one JSON line with load_s,
step_s, sampler_s, vae_decode_s, generate_total_s, peak_rss_gb (x2t: token_s, und_generate_s, num_generated)
and saves its final latent as out/latent.N with --out. It mirrors the official inference script, so it is not
part of this repository; docs/performance.md says how the figures there were made. Run ours with the same torch
(e.g. the .venv that tools/dev.sh makes: torch 2.13 CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, REPO  # noqa: E402
from bench.random_release import mid_release  # noqa: E402

CAPTION = "A red cat holds a blue sign that says STOP."
EDIT = "Remove the hat and make the sky green."
VIDEO = "A small boat sails across a calm lake at sunset."
FRAMES = 5
X2T = ("Look at the image carefully and answer the question.", "What color is the square?")
IMAGE = GOLDEN / "inputs" / "image.png"
SAMPLING = dict(steps=10, cfg=4.0, shift=3.5, seed=42)
TOKENS = 64

OURS = """
import json, sys, time, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from lance_model import load_lance
from lance_model.io.media import load_image

def hwm_gb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 2**20

task, size, steps = {task!r}, {size}, {steps}
start = time.perf_counter()
pipe = load_lance({root!r}, dtype="fp32", device="cpu")
result = dict(load_s=time.perf_counter() - start, torch=torch.__version__)
options = dict(steps=steps, cfg_scale={cfg}, shift={shift}, cfg_interval=(0.4, 1.0), seed={seed}, decode=False)
marks = []
with torch.inference_mode():
    start = time.perf_counter()
    if task == "x2t":
        out = pipe.understand(load_image({image!r}), {question!r}, instruction={instruction!r},
                              resolution="image_256res", max_new_tokens={tokens},
                              on_token=lambda _: marks.append(time.perf_counter()))
        end = time.perf_counter()
        from lance_model.tasks.understanding import STREAM_CHUNK_TOKENS  # on_token: once per chunk of this many ids
        result.update(generate_total_s=end - start, num_generated=len(out.token_ids),
                      token_s=[(b - a) / STREAM_CHUNK_TOKENS for a, b in zip(marks, marks[1:])])
    else:
        on_step = lambda *_: marks.append(time.perf_counter())
        if task == "t2i":
            out = pipe.text_to_image({caption!r}, width=size, height=size, on_step=on_step, **options)
        elif task == "t2v":
            out = pipe.text_to_video({video!r}, width=size, height=size, num_frames={frames}, on_step=on_step, **options)
        else:
            out = pipe.edit_image(load_image({image!r}), {edit!r}, resolution="image_256res", on_step=on_step, **options)
        sampled = time.perf_counter()
        pixels = pipe.decode_latents(out.latents)
        end = time.perf_counter()
        torch.save(out.latents[0].permute(1, 2, 3, 0).contiguous(), {latent_path!r})
        result.update(generate_total_s=end - start, sampler_s=sampled - start, vae_decode_s=end - sampled,
                      step_s=[b - a for a, b in zip(marks, marks[1:])])
result["peak_rss_gb"] = hwm_gb()
print(json.dumps(result))
"""


def official_command(args, task: str, size: int, work: Path) -> list[str]:
    common = [args.runner_python, args.runner, "--release", str(mid_release()), "--threads", str(args.threads),
              "--steps", str(SAMPLING["steps"]), "--cfg", str(SAMPLING["cfg"]), "--shift", str(SAMPLING["shift"]),
              "--seed", str(SAMPLING["seed"]), "--height", str(size), "--width", str(size)]
    if task == "t2i":
        return common + ["--task", "t2i", "--caption", CAPTION, "--out", str(work / "official.safetensors")]
    if task == "t2v":
        return common + ["--task", "t2v", "--num-frames", str(FRAMES), "--resolution", "video_192p", "--caption", VIDEO,
                         "--out", str(work / "official.safetensors")]
    if task == "image_edit":
        dataset = {"0001": {"interleave_array": [EDIT, str(IMAGE)], "element_dtype_array": ["text", "image"],
                            "istarget_in_interleave": [0, 0]}}
        return common + ["--task", "image_edit", "--dataset-json", _write(work / "edit.json", dataset),
                         "--out", str(work / "official.safetensors")]
    dataset = {"0001": {"interleave_array": [str(IMAGE), [X2T[0], X2T[1], ""]], "element_dtype_array": ["image", "text"],
                        "istarget_in_interleave": [0, 1]}}
    return common + ["--task", "x2t_image", "--dataset-json", _write(work / "x2t.json", dataset),
                     "--max-new-tokens", str(TOKENS)]


def _write(path: Path, dataset: dict) -> str:
    path.write_text(json.dumps(dataset, indent=2))   # several lines: the official loader tries JSONL first
    return str(path)


def run_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(args, task: str, size: int, work: Path) -> dict:
    code = OURS.format(repo=str(REPO), threads=args.threads, task=task, size=size, root=str(mid_release()),
                       cfg=SAMPLING["cfg"], shift=SAMPLING["shift"], seed=SAMPLING["seed"], steps=SAMPLING["steps"],
                       image=str(IMAGE), question=X2T[1], instruction=X2T[0], tokens=TOKENS, caption=CAPTION,
                       edit=EDIT, video=VIDEO, frames=FRAMES, latent_path=str(work / "ours.pt"))
    return run_json([args.python, "-c", code])


def latent_difference(work: Path) -> float | None:
    import torch
    from safetensors.torch import load_file
    if not (work / "official.safetensors").exists() or not (work / "ours.pt").exists():
        return None
    official = load_file(str(work / "official.safetensors"))
    target = official[max(key for key in official if key.startswith("out/latent."))]
    ours = torch.load(work / "ours.pt", weights_only=True)
    return float((ours.reshape(target.shape) - target).abs().max())


def figures(runs: list[dict], task: str) -> dict[str, list[float]]:
    table = {"total (prompt to pixels)": [r["generate_total_s"] for r in runs], "peak RSS GB": [r["peak_rss_gb"] for r in runs]}
    if task == "x2t":
        table["median s/token"] = [statistics.median(r["token_s"]) for r in runs]
    else:
        table["sampling"] = [r["sampler_s"] for r in runs]
        table["VAE decode"] = [r["vae_decode_s"] for r in runs]
        table["median CFG step"] = [statistics.median(r["step_s"][:-1]) for r in runs]   # the last is outside CFG
    return table


def report(task: str, size: int, official: list[dict], ours: list[dict], differences: list) -> None:
    print(f"{task} {size}x{size}" + (f"x{FRAMES} frames" if task == "t2v" else "") + (f", {TOKENS} new tokens (generated: official {official[0]['num_generated']}, "
                                      f"ours {ours[0]['num_generated']})" if task == "x2t" else ""))
    theirs, mine = figures(official, task), figures(ours, task)
    for name in theirs:
        a, b = theirs[name], mine[name]
        print(f"  {name:<26} official min {min(a):8.3f} med {statistics.median(a):8.3f} | ours min {min(b):8.3f} "
              f"med {statistics.median(b):8.3f} | ratio {min(a) / min(b):5.2f}x (min) {statistics.median(a) / statistics.median(b):5.2f}x (med)")
    known = [d for d in differences if d is not None]
    if known:
        print(f"  final latent max |official - ours| {max(known):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", required=True)
    parser.add_argument("--runner-python", required=True)
    parser.add_argument("--python", default=sys.executable, help="interpreter for ours (default: this one)")
    parser.add_argument("--tasks", default="t2i,image_edit,t2v,x2t")
    parser.add_argument("--sizes", default="256")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    jobs = [(task, int(size)) for task in args.tasks.split(",")
            for size in (args.sizes.split(",") if task == "t2i" else ["256"])]
    results = {job: ([], [], []) for job in jobs}
    for _ in range(args.repeat):
        for job in jobs:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                official, ours, differences = results[job]
                official.append(run_json(official_command(args, job[0], job[1], work)))
                ours.append(run_ours(args, job[0], job[1], work))
                differences.append(latent_difference(work))
                print(f"  [{job[0]} {job[1]}] official {official[-1]['generate_total_s']:.2f} s, "
                      f"ours {ours[-1]['generate_total_s']:.2f} s", flush=True)
    print(f"mid release, fp32 CPU, {args.threads} threads; official torch {results[jobs[0]][0][0].get('torch')}, "
          f"ours torch {results[jobs[0]][1][0].get('torch')}")
    for job in jobs:
        report(job[0], job[1], *results[job])


if __name__ == "__main__":
    main()
