"""Loading memory: writes a release-width LLM checkpoint with a few layers (random bf16 weights, the release's key
names) to a temporary folder, loads it through the library's loader in a fresh process, and reports the peak
resident memory against the size of the weights (bench_real_size.py does the same for a whole real-size release).

    python bench/bench_loading.py [--layers 4] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GOLDEN, real_width_config  # noqa: E402
from lance_model.runtime.loader import llm_expected_keys  # noqa: E402

# Peak anonymous memory (RssAnon, sampled every 5 ms) of a fresh process, in kB, and beside it VmHWM (every resident
# page). The loader reads tensors with plain file reads, so no file-backed pages of the weights stay resident.
LOAD_AND_REPORT = """
import sys, threading, time, torch
sys.path.insert(0, {repo!r})
from lance_model.nn.checkpoint import resolve_release
from lance_model.runtime.loader import load_llm
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
peak = [status("RssAnon")]
base = peak[0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
llm = load_llm(resolve_release({root!r}), getattr(torch, {dtype!r}), torch.device("cpu"))
checksum = sum(float(p.sum(dtype=torch.float32)) for p in llm.parameters())  # touch every weight
seconds = time.perf_counter() - start
time.sleep(0.05)
done.set()
weights = sum(p.numel() * p.element_size() for p in llm.parameters())
print(base, peak[0], weights, seconds, status("VmHWM"))
"""


def write_release(root: Path, layers: int) -> int:
    """A release folder whose LLM has `layers` real-width layers; ViT/VAE/tokenizer copied from the tiny set."""
    cfg = real_width_config(layers)
    shutil.copytree(GOLDEN / "checkpoint", root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    raw = json.loads((root / "Lance_3B" / "llm_config.json").read_text())
    raw.update(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=cfg.vocab_size, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    (root / "Lance_3B" / "llm_config.json").write_text(json.dumps(raw))
    tensors = {key: torch.randn(shape, dtype=torch.bfloat16) * 0.02 for key, shape in llm_expected_keys(cfg).items()}
    path = root / "Lance_3B" / "model.safetensors"
    save_file(tensors, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "release"
        file_bytes = write_release(root, args.layers)
        code = LOAD_AND_REPORT.format(repo=str(Path(__file__).resolve().parents[1]), root=str(root), dtype=dtype)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base_kb, peak_kb, weight_bytes, seconds, hwm_kb = int(out[0]), int(out[1]), int(out[2]), float(out[3]), int(out[4])
    gib = 2 ** 30
    print(f"{args.layers} real-width layers: file {file_bytes / gib:.2f} GiB (bf16), loaded as {args.dtype} "
          f"{weight_bytes / gib:.2f} GiB and read once in {seconds:.1f}s; peak anonymous memory "
          f"{(peak_kb - base_kb) / 2**20:.2f} GiB above the interpreter = {(peak_kb - base_kb) * 1024 / weight_bytes:.2f}x "
          f"the loaded weights (peak RSS incl. mmapped file pages {hwm_kb / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
