"""VAE decode speed on the release-size Wan2.2 VAE (random weights, bench/random_release.py): this pack's
zero-skipping causal convs (lance_model/nn/vae_convs.py) against diffusers' plain layers, interleaved in one run,
with the largest output difference.

    python bench/bench_vae.py [--size 256] [--latent-frames 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_release import mid_release  # noqa: E402
from lance_model.nn.vae import load_vae  # noqa: E402
from lance_model.nn.vae_convs import ZeroSkippingCausalConv3d  # noqa: E402


def set_zero_skipping(vae, enabled: bool) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    for layer in vae.module.modules():
        if isinstance(layer, WanCausalConv3d):
            layer.__class__ = ZeroSkippingCausalConv3d if enabled else WanCausalConv3d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--latent-frames", type=int, default=1, help="1 = an image; 2 = 5 frames, ...")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    vae = load_vae(mid_release() / "Wan2.2_VAE.pth")
    z = torch.randn(1, vae.z_dim, args.latent_frames, args.size // 16, args.size // 16,
                    generator=torch.Generator().manual_seed(0))
    times, outputs = {True: [], False: []}, {}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for enabled in (False, True):
                set_zero_skipping(vae, enabled)
                start = time.perf_counter()
                outputs[enabled] = vae.decode(z)
                times[enabled].append(time.perf_counter() - start)
    frames = (args.latent_frames - 1) * 4 + 1
    print(f"VAE decode {args.size}x{args.size}x{frames} frames, {torch.get_num_threads()} threads, fp32")
    for enabled, label in ((False, "diffusers layers"), (True, "zero-skipping")):
        print(f"  {label:<18} min {min(times[enabled]):7.2f} s   median {statistics.median(times[enabled]):7.2f} s")
    ratio = min(times[False]) / min(times[True]), statistics.median(times[False]) / statistics.median(times[True])
    print(f"  speed-up {ratio[0]:.2f}x (min) / {ratio[1]:.2f}x (median); "
          f"max |difference| {(outputs[True] - outputs[False]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
