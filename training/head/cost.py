"""Memory / communication cost model of the sharded prototype head (training/head/sharded.py).

``head_cost`` sizes a ShardedPrototypeHead without building one: bytes per shard (rows, momentum,
KNN graph, step and refresh transients), the GPUs a library of U prototypes needs, and the bytes
each collective moves per rank per step. Pure arithmetic, kept apart from the head so that
benchmarks/bench_head_scale.py and docs/sharded_head.md (generated from it) can plan paper-scale
runs (U = 1e9) on any machine.
"""
from __future__ import annotations

import math

from training.head.knn_graph import knn_width


def head_cost(num_classes: int, dim: int, world_size: int, row_bytes: int = 4, batch: int = 256,
              knn_k: int | None = 64, fraction: float | None = None, momentum_bytes: int = 4,
              emb_bytes: int = 2, num_prefixes: int = 1, refresh_steps: int = 50,
              gpu_bytes: float = 80e9, reserve_bytes: float = 0.0, index_on_gpu: bool = True) -> dict:
    """Memory (bytes per shard), GPUs needed and communication (bytes per rank per step) of the head.

    ``batch`` is the global batch N; the scored set is at most ``N * (k + 1)`` classes with k
    neighbours per target (``knn_k``), or ``k = ceil(fraction * U)`` when ``fraction`` is given.
    Ring collectives: an all-gather moves (W-1)/W of the total to each rank, an all-reduce 2(W-1)/W.
    ``reserve_bytes`` is what the backbone, its optimizer and activations need on every GPU;
    ``index_on_gpu=False``: the refresh's faiss index (fp32 copy of the shard) lives in host RAM
    (``graph_gpu=False``) and does not count against the GPU.
    """
    u, d, w, n = int(num_classes), int(dim), int(world_size), int(batch)
    k = knn_width(u, fraction) if fraction is not None else int(knn_k or 0)
    classes = min(u, n * (k + 1))
    graph_bytes = 4 if u < 2**31 else 8

    def shard(w_: int) -> dict:
        rows_local = math.ceil(u / w_)
        c_local = math.ceil(classes / w_)
        persistent = {"rows": rows_local * d * row_bytes, "momentum": rows_local * d * momentum_bytes,
                      "graph": rows_local * k * graph_bytes if k < u - 1 else 0}
        step = (2 * c_local * d * 4                              # fp32 master leaf + its gradient
                + 3 * num_prefixes * n * c_local * 4)            # logits, softmax, their gradient
        refresh = rows_local * d * 4 if persistent["graph"] else 0   # IVF/Flat index: fp32 copy
        on_gpu = refresh if index_on_gpu else 0
        return {**persistent, "step_transient": step, "refresh_transient": refresh,
                "total": sum(persistent.values()) + max(step, on_gpu)}

    mem = shard(w)
    per_gpu = gpu_bytes - reserve_bytes
    per_row = d * (row_bytes + momentum_bytes + 4 * index_on_gpu) + (k * graph_bytes if k < u - 1 else 0)
    gpus = max(1, math.ceil(u * per_row / per_gpu)) if per_gpu > 0 else math.inf
    while per_gpu > 0 and shard(gpus)["total"] > per_gpu:
        gpus += 1
    ag, ar = (w - 1) / w, 2 * (w - 1) / w
    comm = {"allgather_embeddings": ag * n * d * emb_bytes, "allgather_labels": ag * n * 8,
            "allgather_batch_meta": ag * w * 6 * 8,
            "allreduce_neighbours": ar * n * k * graph_bytes if k < u - 1 else 0,
            "allreduce_max": ar * num_prefixes * n * 4, "allreduce_sumexp_target": ar * 2 * num_prefixes * n * 4,
            "reduce_scatter_embedding_grads": ag * n * d * emb_bytes}
    comm["per_step"] = sum(comm.values())
    # graph refresh: every rank receives every other shard once (row dtype) and sends candidates back
    refresh_bytes = ag * u * (d * row_bytes + (k + 1) * 16) if k < u - 1 else 0
    comm["refresh"] = refresh_bytes
    comm["refresh_per_step"] = refresh_bytes / refresh_steps if refresh_steps > 0 else 0.0
    flops = 6 * n * math.ceil(classes / w) * d * num_prefixes   # fwd + bwd matmuls, upper bound
    return {"num_classes": u, "dim": d, "world_size": w, "knn_k": k, "classes_scored_max": classes,
            "rows_per_shard": math.ceil(u / w), "bytes_per_shard": mem, "gpus_needed": gpus,
            "gpu_bytes": gpu_bytes, "comm_bytes": comm, "flops_per_step_per_shard": flops}

