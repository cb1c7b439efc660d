"""The arithmetic of docs/scale.md: what 10 M, 100 M and 1 B catalog items cost to embed, index
and train on, from measured figures and stated assumptions (each printed beside the table).

    .venv/bin/python benchmarks/scale_costs.py [--embed-ips 12.1] [--dim 512] [--items 1e7,1e8,1e9]

- Embedding: GPU-hours = items / (images per second per GPU) / 3600. The per-GPU rate is a FLOP
  estimate (2 x parameters x tokens per item at a stated utilisation of a stated peak), since no
  GPU was measured here; the CPU column uses --embed-ips, measured on this machine.
- Index: IVF-PQ bytes per vector = m (PQ code) + 8 (the id faiss keeps in the inverted list)
  + dim (the SQ8 re-rank codes, when on); checked against the measured 1M x 512 index
  (IVF4096,PQ64 + SQ8: 565 MiB, BENCHMARKS.md). Nodes = memory / usable RAM per node.
- Head: training.head.head_cost (the model docs/sharded_head.md is generated from) with one
  prototype per item (the upper bound; curation pools listings into fewer).
"""
from __future__ import annotations

import argparse
import math

from training.head import head_cost

MEASURED_1M_512_MIB = 565   # BENCHMARKS.md "ANN index at 1M x 512": IVF4096,PQ64x8 + SQ8 re-rank


def embed_rate_per_gpu(params: float, tokens: int, peak_flops: float, utilisation: float) -> float:
    """Items per second one GPU embeds: forward FLOPs = 2 x parameters x tokens."""
    return peak_flops * utilisation / (2 * params * tokens)


def ivfpq_bytes(dim: int, m: int = 64, refine: bool = True) -> int:
    return m + 8 + (dim if refine else 0)


def gib(x: float) -> str:
    return f"{x / 2**30:,.0f}" if x >= 2**30 else f"{x / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="1e7,1e8,1e9")
    ap.add_argument("--dim", type=int, default=512, help="served dim (the paper's 512)")
    ap.add_argument("--embed-ips", type=float, default=30.0,
                    help="images/s measured on this CPU: the packaged base model, 2,250 images "
                         "(BENCHMARKS.md, batch embedding in-process vs Ray)")
    ap.add_argument("--params", type=float, default=2.2e9, help="embedder parameters (Qwen2-VL-2B)")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per item: ~256 image + title")
    ap.add_argument("--peak", type=float, default=989e12, help="GPU dense bf16 peak FLOP/s (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed utilisation of the peak")
    ap.add_argument("--node-ram", type=float, default=512, help="usable RAM per index node, GiB")
    ap.add_argument("--gpu-gb", type=float, default=80)
    ap.add_argument("--reserve-gb", type=float, default=40, help="GPU memory kept for the backbone")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.items.split(",")]
    rate = embed_rate_per_gpu(args.params, args.tokens, args.peak, args.mfu)
    per_vec = ivfpq_bytes(args.dim)
    check = ivfpq_bytes(512) * 1e6 / 2**20

    print(f"Assumptions: embedder {args.params:.1e} parameters, {args.tokens} tokens per item, "
          f"{args.peak / 1e12:.0f} TFLOP/s peak at {args.mfu:.0%} -> {rate:,.0f} items/s per GPU "
          f"(estimate); this CPU: {args.embed_ips} images/s (measured). IVF-PQ m=64 + SQ8 at dim "
          f"{args.dim}: {per_vec} B/vector (the formula gives {check:.0f} MiB at 1M x 512; measured "
          f"{MEASURED_1M_512_MIB} MiB). Index nodes with {args.node_ram:.0f} GiB usable RAM. Head: "
          f"bf16 rows + bf16 momentum, k = 64, {args.gpu_gb:.0f} GB GPUs with {args.reserve_gb:.0f} GB "
          f"reserved for the backbone, one prototype per item.\n")
    print("| items | embed GPU-hours | embed days on this 2-core CPU | index GiB (PQ64+SQ8) | index GiB "
          "(PQ64 only) | index nodes | head GPUs | head GiB per rank |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        index = n * per_vec
        head = head_cost(n, args.dim, 1, row_bytes=2, momentum_bytes=2, knn_k=64,
                         gpu_bytes=args.gpu_gb * 1e9, reserve_bytes=args.reserve_gb * 1e9)
        gpus = head["gpus_needed"]
        per_rank = head_cost(n, args.dim, gpus, row_bytes=2, momentum_bytes=2, knn_k=64,
                             gpu_bytes=args.gpu_gb * 1e9, reserve_bytes=args.reserve_gb * 1e9)
        print(f"| {n:.0e} | {n / rate / 3600:,.0f} | {n / args.embed_ips / 86400:,.0f} | {gib(index)} | "
              f"{gib(n * ivfpq_bytes(args.dim, refine=False))} | {math.ceil(index / 2**30 / args.node_ram)} | "
              f"{gpus} | {gib(per_rank['bytes_per_shard']['total'])} |")


if __name__ == "__main__":
    main()
