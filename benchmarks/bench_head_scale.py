"""Prototype head at scale (GitHub issue #4): step time, memory and KNN-graph rebuild time of
training.head.ShardedPrototypeHead from U = 1e4 to 1e7 prototypes on one CPU machine, at a
FIXED number of neighbours per target (so a fixed bound on the scored classes).

Per size, in a fresh process (so the peak RSS is that size's): clustered unit prototype rows
[U, D] (clusters of 1000 around random centres), the head with ``knn_k`` neighbours per target, the
graph built by ``refresh_graph`` (exact faiss below the head's ``approx_above``, IVF above) and
timed; then ``--steps`` training steps (forward + backward + ``sparse_sgd_step``) on random unit
embeddings [batch, D] with random targets, for the KNN sampler and the random (Partial-FC) sampler
at the same class count. Above ``--full-rebuild-max`` rows a full rebuild takes longer than the
benchmark should (IVF on 2 cores: ~30 min at 1e7), so the IVF index is trained and filled on all
rows (timed) but only ``--subset`` query rows are searched (timed); the rebuild time is
``build + per-query search time x U`` (reported as extrapolated), the graph rows of the searched
subset are installed (the rest random) and the timed steps draw their targets from that subset.
``recall@k`` compares 200 graph rows with brute force. ``--world2 U`` adds a 2-process gloo run.

    python benchmarks/bench_head_scale.py                       # 1e4 .. 1e7, writes results/head_scale.json
    python benchmarks/bench_head_scale.py --sizes 1e4,1e5 --steps 5
    python benchmarks/bench_head_scale.py --cost-table          # paper-scale memory model (docs)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.head import ShardedPrototypeHead, build_index, head_cost  # noqa: E402

DIMS, WEIGHTS, MARGIN, TAU = [64, 128], [0.5, 1.0], 0.2, 0.05
GB = 1e9


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def rss_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def make_rows(u: int, d: int, seed: int = 0, cluster: int = 1000, chunk: int = 1 << 20) -> torch.Tensor:
    """Unit rows around random centres, cluster of ``cluster`` consecutive ids (built in chunks)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn((u + cluster - 1) // cluster, d, generator=g), dim=-1)
    rows = torch.empty(u, d)
    for a in range(0, u, chunk):
        b = min(u, a + chunk)
        x = centres[torch.arange(a, b) // cluster] + (0.6 / d ** 0.5) * torch.randn(b - a, d, generator=g)
        rows[a:b] = F.normalize(x, dim=-1)
    return rows


def exact_knn(rows: torch.Tensor, ids: torch.Tensor, k: int, chunk: int = 1 << 18) -> torch.Tensor:
    """Brute-force k nearest other rows of rows[ids] (for recall)."""
    q = F.normalize(rows[ids].float(), dim=-1)
    best_s, best_i = torch.full((len(ids), k), -2.0), torch.zeros((len(ids), k), dtype=torch.long)
    for a in range(0, rows.shape[0], chunk):
        s = q @ F.normalize(rows[a:a + chunk].float(), dim=-1).T
        s[(ids.view(-1, 1) - a) == torch.arange(s.shape[1]).view(1, -1)] = -2.0   # not itself
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, torch.arange(a, a + s.shape[1]).expand(len(ids), -1)], 1)
        best_s, pos = s.topk(k, dim=1)
        best_i = i.gather(1, pos)
    return best_i


def child(u: int, args, rank: int = 0, world: int = 1, store: str = "") -> dict:
    # one torch thread by default: on a shared 2-core machine, 2 OpenMP threads next to other busy
    # processes make small ops 10-50x slower (spinning barriers), which would measure the neighbours
    torch.set_num_threads(args.threads)
    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=1800))
    rows = make_rows(u, args.dim)
    head = ShardedPrototypeHead(rows, DIMS, WEIGHTS, MARGIN, TAU, knn_k=args.k, refresh_steps=0,
                                build_graph=False, seed=0)
    del rows   # the head holds its own copy (at world 1: all rows, in id order)
    gc.collect()
    out = {"U": u, "world": world, "rank": rank, "D": args.dim, "batch": args.batch, "k": args.k,
           "graph_index": head.graph_index, "graph_search": head.graph_search if head.graph_index != "Flat" else ""}
    pool = None
    if u <= args.full_rebuild_max or world > 1:
        t = time.perf_counter()
        head.refresh_graph()
        out.update(rebuild_s=time.perf_counter() - t, rebuild="measured")
    else:   # build on all rows, search a subset of queries, extrapolate the search to all U
        t = time.perf_counter()
        index = build_index(head.rows, head.graph_index, head.graph_search, seed=head.seed)
        t_build = time.perf_counter() - t
        pool = torch.from_numpy(np.sort(np.random.default_rng(1).choice(u, args.subset, replace=False)))
        t = time.perf_counter()
        nb = []
        for a in range(0, len(pool), 1 << 15):
            q = F.normalize(head.rows[pool[a:a + (1 << 15)]].float(), dim=-1).numpy()
            _, idx = index.search(q, args.k + 1)
            nb.append(torch.from_numpy(idx))
        t_search = time.perf_counter() - t
        del index
        gc.collect()
        nb, me = torch.cat(nb), pool.view(-1, 1)
        drop = (nb == me) | (nb < 0)                 # self and missing results to the back, k kept
        nb = nb.gather(1, torch.argsort(drop.int(), dim=1, stable=True))[:, : args.k]
        nb = torch.where(nb < 0, me, nb)
        graph = torch.randint(0, u, (u, args.k), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
        graph[pool] = nb.int()
        head.set_graph(graph)
        del graph
        out.update(rebuild_s=t_build + t_search / len(pool) * u, rebuild="extrapolated",
                   index_build_s=t_build, searched_queries=len(pool), search_s=t_search)
    if world == 1:
        cand = pool if pool is not None else torch.arange(u)
        probe = cand[torch.randperm(len(cand), generator=torch.Generator().manual_seed(3))[:200]]
        exact = exact_knn(head.rows, probe, args.k)
        out["recall"] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in
                                       zip(head.graph[probe].tolist(), exact.tolist())]))
    g = torch.Generator().manual_seed(10 + rank)
    local_b = args.batch // world
    for sampler in ("knn", "random"):
        head.sampler = sampler
        times, scored, moved = [], [], []
        for step in range(args.warmup + args.steps):
            h = F.normalize(torch.randn(local_b, args.dim, generator=g), dim=-1).requires_grad_()
            y = (pool[torch.randint(0, len(pool), (local_b,), generator=g)] if pool is not None
                 else torch.randint(0, u, (local_b,), generator=g))
            t = time.perf_counter()
            loss, stats = head(h, y)
            loss.backward()
            n_moved = head.sparse_sgd_step(0.1, 0.9)
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
                scored.append(stats["classes_scored"])
                moved.append(n_moved)
        out[sampler] = {"step_ms_median": 1e3 * float(np.median(times)), "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
                        "classes_scored_mean": float(np.mean(scored)), "rows_moved_mean": float(np.mean(moved))}
    model = head_cost(u, args.dim, world, row_bytes=4, batch=args.batch, knn_k=args.k, momentum_bytes=4,
                      emb_bytes=4, num_prefixes=len(DIMS))["bytes_per_shard"]
    out.update(peak_rss_gb=rss_peak(), rss_gb=rss_now(), model_gb=model["total"] / GB,
               model_persistent_gb=(model["rows"] + model["momentum"] + model["graph"]) / GB)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return out


def run_size(u: int, world: int, args) -> list[dict]:
    store = Path(args.tmp) / f"store_{u}_{world}_{time.monotonic_ns()}"
    base = [sys.executable, __file__, "--child", str(u), "--world-size", str(world), "--store", str(store),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--dim", str(args.dim),
            "--batch", str(args.batch), "--k", str(args.k), "--subset", str(args.subset),
            "--full-rebuild-max", str(args.full_rebuild_max), "--threads", str(args.threads),
            "--faiss-threads", str(args.faiss_threads)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    procs = [subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    results = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"U={u} world={world}: child exited {p.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def table(results: list[dict]) -> str:
    lines = ["| U | ranks | sampler | classes scored | step ms (median) | step ms (p90) | graph index | "
             "rebuild s | recall@k | peak RSS GB | RSS after GB | model GB/shard |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in ("knn", "random"):
            rebuild = f"{r['rebuild_s']:.1f}" + (" (extrapolated)" if r["rebuild"] == "extrapolated" else "")
            recall = f"{r['recall']:.3f}" if "recall" in r else "-"
            lines.append(f"| {r['U']:.0e} | {r['world']} | {s} | {r[s]['classes_scored_mean']:.0f} | "
                         f"{r[s]['step_ms_median']:.1f} | {r[s]['step_ms_p90']:.1f} | {r['graph_index']} "
                         f"{r['graph_search']} | {rebuild} | {recall} | {r['peak_rss_gb']:.2f} | {r['rss_gb']:.2f} | "
                         f"{r['model_gb']:.2f} |")
    return "\n".join(lines)


def cost_table(u: int = 10**9, d: int = 512, gpu_gb: float = 80, batch: int = 256) -> str:
    """Paper-scale memory / communication model (docs/sharded_head.md is generated from this)."""
    lines = [f"U = {u:.0e} prototypes, D = {d}, global batch {batch}, {gpu_gb:.0f} GB GPUs, one MRL prefix, "
             "bf16 embeddings. Reserve = GPU memory kept for the data-parallel backbone (weights, optimizer, "
             "activations). Index = where the refresh's faiss index (an fp32 copy of the shard) lives.", "",
             "| rows | momentum | k | index | reserve GB | GPUs needed | rows GB/shard | momentum GB/shard | "
             "graph GB/shard | refresh index GB | classes scored | GFLOP/step/shard | comm MB/step/rank | "
             "refresh GB/rank |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    name = {4: "fp32", 2: "bf16"}
    configs = [(rb, mb, 64, gpu, res) for rb, mb in ((4, 4), (2, 4), (2, 2)) for gpu in (True, False)
               for res in (0, 40)] + [(2, 2, 256, False, 40)]
    for rb, mb, k, gpu, reserve in configs:
        kw = dict(row_bytes=rb, batch=batch, knn_k=k, momentum_bytes=mb, gpu_bytes=gpu_gb * GB,
                  reserve_bytes=reserve * GB, index_on_gpu=gpu)
        c = head_cost(u, d, head_cost(u, d, 1, **kw)["gpus_needed"], **kw)
        m, cm = c["bytes_per_shard"], c["comm_bytes"]
        lines.append(f"| {name[rb]} | {name[mb]} | {k} | {'GPU' if gpu else 'host'} | {reserve} | {c['gpus_needed']} | "
                     f"{m['rows'] / GB:.1f} | {m['momentum'] / GB:.1f} | {m['graph'] / GB:.2f} | "
                     f"{m['refresh_transient'] / GB:.1f} | {c['classes_scored_max']} | "
                     f"{c['flops_per_step_per_shard'] / 1e9:.2f} | {cm['per_step'] / 1e6:.2f} | {cm['refresh'] / GB:.0f} |")
    c = head_cost(u, d, 64, fraction=0.1, batch=batch, row_bytes=2)
    lines += ["", f"With knn_fraction = 0.1 taken literally (k = {c['knn_k']:.0e} neighbours per target) every "
              f"step scores all {c['classes_scored_max']:.0e} classes: the full softmax, "
              f"{c['flops_per_step_per_shard'] * 64 / 1e15:.1f} PFLOP per step over all shards. "
              "At this scale the fraction has to become a fixed k."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=64, help="neighbours per target (fixed)")
    ap.add_argument("--subset", type=int, default=100_000, help="queries searched when extrapolating")
    ap.add_argument("--full-rebuild-max", type=float, default=2e6, help="largest U rebuilt in full")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--faiss-threads", type=int, default=0, help="faiss OpenMP threads (0: all cores)")
    ap.add_argument("--world2", default="", help="also run these sizes on 2 gloo processes, e.g. 1e6")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/head_scale.json"))
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--cost-table", action="store_true")
    ap.add_argument("--child", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.full_rebuild_max = int(args.full_rebuild_max)
    if args.cost_table:
        print(cost_table())
        return
    if args.child:
        print(json.dumps(child(int(args.child), args, args.rank, args.world_size, args.store)))
        return
    results = []
    runs = [(int(float(s)), 1) for s in args.sizes.split(",") if s]
    runs += [(int(float(s)), 2) for s in args.world2.split(",") if s]
    for u, world in runs:
        t = time.perf_counter()
        per_rank = run_size(u, world, args)
        r = dict(per_rank[0])
        if world > 1:   # the slowest rank sets the pace; memory is per rank
            for s in ("knn", "random"):
                r[s] = max((x[s] for x in per_rank), key=lambda v: v["step_ms_median"])
            r["peak_rss_gb"] = max(x["peak_rss_gb"] for x in per_rank)
            r["rss_gb"] = max(x["rss_gb"] for x in per_rank)
            r["rebuild_s"] = max(x["rebuild_s"] for x in per_rank)
        r["wall_s"] = time.perf_counter() - t
        results.append(r)
        print(f"U={u:.0e} world={world}: knn {r['knn']['step_ms_median']:.1f} ms, random "
              f"{r['random']['step_ms_median']:.1f} ms, rebuild {r['rebuild_s']:.1f} s ({r['rebuild']}), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB, {r['wall_s']:.0f} s wall", flush=True)
    single = [r for r in results if r["world"] == 1]
    summary = {}
    if len(single) > 1:
        lo, hi = min(single, key=lambda r: r["U"]), max(single, key=lambda r: r["U"])
        summary = {s: hi[s]["step_ms_median"] / lo[s]["step_ms_median"] for s in ("knn", "random")}
        summary["from_U"], summary["to_U"] = lo["U"], hi["U"]
    print()
    print(table(results))
    if summary:
        print(f"\nstep time ratio U={summary['from_U']:.0e} -> {summary['to_U']:.0e}: "
              f"knn {summary['knn']:.2f}x, random {summary['random']:.2f}x (target <= 2x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__, "dims": DIMS,
            "threads": args.threads, "faiss_threads": args.faiss_threads or os.cpu_count(),
            "argv": sys.argv[1:], "note": "shared machine: timings may include contention"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "step_time_ratio": summary}, indent=1))


if __name__ == "__main__":
    main()
