"""Forward+backward throughput and peak memory of each backbone preset, side by side in one run.

    .venv/bin/python benchmarks/bench_backbone.py [--batch 16] [--steps 5] [--device cpu|cuda]

Synthetic 96x96 images with short titles; the loss is an in-batch logsumexp so the backward pass
is real. bf16 autocast on CUDA. Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from PIL import Image

from core.config import load_params
from training.backbone import MLLMEmbedder

TITLES = ["red striped mug k7", "blue dotted hat a2", "green phone case z9", "yellow rubber duck q1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(args.batch)]
    texts = [TITLES[i % len(TITLES)] for i in range(args.batch)]
    mp = load_params("demo")["model"]
    print(f"device={args.device} batch={args.batch} steps={args.steps}\n")
    print("| preset | params M | seq len | ms/step | samples/s | peak memory MiB |\n|---|---|---|---|---|---|")
    for preset in ("tiny", "small"):
        torch.manual_seed(0)
        m = MLLMEmbedder.from_params(dict(mp, preset=preset), TITLES).to(args.device).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step():
            opt.zero_grad()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                q = m(m.prepare(images, texts))
                (q @ q.T / 0.05).logsumexp(-1).mean().backward()
            opt.step()
        step()  # warm-up
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        mem = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        seq = m.prepare(images[:1], texts[:1])["input_ids"].shape[1]
        print(f"| {preset} | {sum(p.numel() for p in m.parameters()) / 1e6:.2f} | {seq} | {dt * 1000:.0f} | "
              f"{args.batch / dt:.1f} | {mem:.0f} |")


if __name__ == "__main__":
    main()
