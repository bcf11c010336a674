"""The real-size release on CPU: load the random release at the real configuration (bench/random_release.py,
bf16 files, 16.5 GB) in bf16 through `load_lance`, report the load time and the peak resident memory against
the bytes of the loaded weights (goal: <= 1.1x), then run a 2-step t2i at 256^2 and report seconds per step.

    python bench/bench_real_size.py [--steps 2] [--size 256] [--skip-generate] [--memory stream]

`--memory stream` loads with both experts streamed (their weights packed into host slabs, the rest placed on the
device - here the CPU too, and the streamer's device slots with it): the VRAM ladder's host-memory goal is a peak
of at most 1.15x the weights, and slab bytes at most 1.05x the streamed weights.

The load runs in a fresh process, so its peak (VmHWM: every resident page, file-backed ones included) belongs
to the load alone; a sampler thread also records the peak anonymous memory (RssAnon).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_release import random_release  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Runs in the fresh process: load, measure, optionally generate; prints one JSON line.
CHILD = """
import json, sys, threading, time, torch
sys.path.insert(0, {repo!r})
from lance_model import load_lance

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) * 1024

peak_anon, done = [status("RssAnon")], threading.Event()
def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
before = status("VmRSS")
start = time.perf_counter()
pipe = load_lance({root!r}, dtype="bf16", device="cpu", memory={memory!r})
load_s = time.perf_counter() - start
modules = (pipe.llm, pipe.vit.module, pipe.vae.module)
weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
result = dict(load_s=load_s, weights=weights, rss_before_load=before, load_peak_rss=status("VmHWM"),
              load_peak_anon=peak_anon[0])
streamer = pipe.session.streamer
if streamer is not None:
    streamed = sum(p.numel() * p.element_size() for s in streamer.experts.values() for l in s.params for p in l)
    result.update(streamed=streamed, slab_bytes=streamer.host_bytes, slot_bytes=streamer.slot_bytes)
if {steps}:
    opts = dict(width={size}, height={size}, seed=0, cfg_scale=4.0, shift=3.5, cfg_interval=(0.4, 1.0))
    times = []
    def observe(*step):
        times.append(time.perf_counter())
    start = time.perf_counter()
    out = pipe.text_to_image("A red cat holds a blue sign that says STOP.", steps={steps}, decode=False,
                             on_step=observe, **opts)
    sampled = time.perf_counter()
    pixels = pipe.decode_latents(out.latents)
    result.update(first_step_s=times[0] - start, step_s=[b - a for a, b in zip(times, times[1:])],
                  sampling_s=sampled - start, decode_s=time.perf_counter() - sampled,
                  finite=bool(torch.isfinite(pixels).all()), peak_rss=status("VmHWM"))
done.set()
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--memory", default="resident", choices=["resident", "stream"])
    args = parser.parse_args()
    root = random_release("real")
    files = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    code = CHILD.format(repo=str(REPO), root=str(root), steps=0 if args.skip_generate else args.steps, size=args.size,
                        memory=args.memory)
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    gb, weights = 1e9, result["weights"]
    print(f"real-size release {root}: files {files / gb:.2f} GB, loaded weights (bf16) {weights / gb:.2f} GB")
    limit = 1.15 if args.memory == "stream" else 1.1
    print(f"  memory {args.memory}: load {result['load_s']:.1f} s; peak RSS {result['load_peak_rss'] / gb:.2f} GB = "
          f"{result['load_peak_rss'] / weights:.3f}x the weights (limit {limit}x; the interpreter alone "
          f"{result['rss_before_load'] / gb:.2f} GB); peak anonymous {result['load_peak_anon'] / gb:.2f} GB")
    if "streamed" in result:
        print(f"  streamed weights {result['streamed'] / gb:.2f} GB in host slabs of {result['slab_bytes'] / gb:.2f} GB "
              f"= {result['slab_bytes'] / result['streamed']:.4f}x (limit 1.05x); device slots "
              f"{result['slot_bytes'] / gb:.2f} GB (on a GPU they are device memory)")
    if "step_s" in result:
        steps = result["step_s"]
        print(f"  t2i {args.size}^2, {args.steps} steps: prefill + first step {result['first_step_s']:.1f} s, "
              f"then {', '.join(f'{s:.1f}' for s in steps)} s per CFG step; decode {result['decode_s']:.1f} s; "
              f"pixels finite: {result['finite']}; peak RSS {result['peak_rss'] / gb:.2f} GB")


if __name__ == "__main__":
    main()
