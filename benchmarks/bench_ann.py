"""faiss Flat vs HNSW vs IVF-PQ on synthetic clustered embeddings: recall@10, QPS, build time, memory.

    .venv/bin/python benchmarks/bench_ann.py [--n 1000000] [--dim 512] [--queries 1000]

Data: retrieval.index.clustered_embeddings (20k instance centres around 500 category centres,
Gaussian noise with a decaying spectrum in a random rotation, L2-normalised); queries are n+1..n+q
of the same generator, so they are not in the index but their instance mates are. Recall@10 is
against exact inner-product search (IndexFlatIP) of the same queries. QPS is a batch of all the
queries, with one thread and with all threads. Index MiB = the index written to disk;
RSS +MiB = resident memory added by building it; the peak RSS of the process is printed at the end.
The indexes are built by retrieval.index.build_index (the code that ships); the IVF-PQ variants
share one trained IVF-PQ: its PQ codes alone, and re-ranked with SQ8 or full vectors (IndexRefine).
Target: recall@10 >= 0.95 at >= 20x the exact QPS. Writes benchmarks/results/ann.json.
"""
from __future__ import annotations

import os

# faiss's OpenMP threads spin-wait by default: on a shared box every busy core makes that several
# times slower (measured here: IVF training 2.1 s on 1 thread, 9.7 s on 2). Passive waiting costs
# little on a dedicated box. Must be set before faiss (the OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # retrieval/ without reinstalling
from retrieval import index as ix  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def disk_mib(index) -> float:
    with tempfile.TemporaryDirectory() as d:
        faiss.write_index(index, f"{d}/i.faiss")
        return os.path.getsize(f"{d}/i.faiss") / 2**20


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(a, b[b >= 0])) / k for a, b in zip(exact, got[:, :k])]))


def qps(index, xq: np.ndarray, k: int, threads: int) -> tuple[float, np.ndarray]:
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    _, labels = index.search(xq, k)
    return len(xq) / (time.perf_counter() - t0), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--exact-1t-queries", type=int, default=0, help="0: all the queries")
    ap.add_argument("--item-noise", type=float, default=0.7)
    ap.add_argument("--spectrum", type=float, default=0.5)
    ap.add_argument("--hnsw-m", type=int, default=ix.DEFAULTS["hnsw"]["M"])
    ap.add_argument("--ef-construction", type=int, default=ix.DEFAULTS["hnsw"]["ef_construction"])
    ap.add_argument("--ef", default="32,64,128,256", help="HNSW efSearch values")
    ap.add_argument("--nlist", default="auto")
    ap.add_argument("--train-size", default="auto")
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--k-factor", type=float, default=ix.DEFAULTS["ivfpq"]["k_factor"])
    ap.add_argument("--kinds", default="hnsw,ivfpq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ann.json"))
    args = ap.parse_args()
    k, nq, T = args.k, args.queries, args.threads
    faiss.omp_set_num_threads(T)

    t0 = time.perf_counter()
    data = ix.clustered_embeddings(args.n + nq, args.dim, clusters=args.clusters, seed=args.seed,
                                   item_noise=args.item_noise, spectrum=args.spectrum)
    xb, xq = data[: args.n], data[args.n:].copy()
    print(f"generated {args.n} x {args.dim} (+{nq} queries) in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []

    def row(kind, params, build_s, mib, rss, rec, q1, qT):
        r = {"index": kind, "params": params, "build_s": build_s, "index_mib": mib, "rss_added_mib": rss,
             f"recall@{k}": rec, "qps_1t": q1, f"qps_{T}t": qT}
        rows.append(r)
        print(json.dumps(r), flush=True)

    # exact baseline and ground truth
    r0 = rss_mib()
    t0 = time.perf_counter()
    flat = ix.build_index(xb, None, {"kind": "flat", "use_gpu": False})
    build_s = time.perf_counter() - t0
    rss = rss_mib() - r0
    exact_qT, exact = qps(flat, xq, k, T)
    exact_q1, _ = qps(flat, xq[: args.exact_1t_queries or nq], k, 1)
    row("flat", "exact", build_s, args.n * args.dim * 4 / 2**20, rss, 1.0, exact_q1, exact_qT)
    del flat
    gc.collect()

    def sweep(kind, index, params, build_s, mib, rss, setter):
        for label, kw in setter:
            ix.set_search_params(index, **kw)
            q1, labels = qps(index, xq, k, 1)
            qT, _ = qps(index, xq, k, T)
            row(kind, f"{params}, {label}", build_s, mib, rss, recall(labels, exact), q1, qT)

    if "hnsw" in args.kinds:
        faiss.omp_set_num_threads(T)
        r0, t0 = rss_mib(), time.perf_counter()
        hnsw = ix.build_index(xb, None, {"kind": "hnsw", "use_gpu": False,
                                         "hnsw": {"M": args.hnsw_m, "ef_construction": args.ef_construction}})
        build_s, rss = time.perf_counter() - t0, rss_mib() - r0
        print(f"hnsw built in {build_s:.0f} s", flush=True)
        sweep("hnsw", hnsw, f"M={args.hnsw_m} efC={args.ef_construction}", build_s, disk_mib(hnsw), rss,
              [(f"ef={e}", {"ef_search": int(e)}) for e in args.ef.split(",")])
        del hnsw
        gc.collect()

    if "ivfpq" in args.kinds:
        faiss.omp_set_num_threads(T)
        cfg = {"kind": "ivfpq", "use_gpu": False, "ivfpq": {
            "nlist": args.nlist if args.nlist == "auto" else int(args.nlist),
            "train_size": args.train_size if args.train_size == "auto" else int(args.train_size),
            "refine": "sq8", "k_factor": args.k_factor}}
        p = ix.ivfpq_params(args.n, args.dim, cfg)
        r0, t0 = rss_mib(), time.perf_counter()
        sq8 = ix.build_index(xb, None, cfg)
        build_s, rss = time.perf_counter() - t0, rss_mib() - r0
        print(f"ivfpq+sq8 built in {build_s:.0f} s", flush=True)
        base = faiss.downcast_index(sq8.base_index)
        base_mib = disk_mib(base)
        name = f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']} (train {p['train_size']})"
        probes = args.nprobe.split(",")
        sweep("ivfpq", base, name, build_s, base_mib, None, [(f"nprobe={n}", {"nprobe": int(n)}) for n in probes])
        sweep("ivfpq+sq8", sq8, name, build_s, disk_mib(sq8), rss,
              [(f"nprobe={n} k_factor={args.k_factor:g}", {"nprobe": int(n), "k_factor": args.k_factor})
               for n in probes])
        r0, t0 = rss_mib(), time.perf_counter()
        ref = faiss.IndexFlatIP(args.dim)
        ref.add(xb)
        full = faiss.IndexRefine(base, ref)  # the same trained IVF-PQ, re-ranked with full vectors
        extra_s, rss = time.perf_counter() - t0, rss_mib() - r0
        sweep("ivfpq+flat", full, name, build_s + extra_s, base_mib + args.n * args.dim * 4 / 2**20, None,
              [(f"nprobe={n} k_factor={args.k_factor:g}", {"nprobe": int(n), "k_factor": args.k_factor})
               for n in probes])

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in rows:
        r["speedup_1t"] = r["qps_1t"] / exact_q1
        r[f"speedup_{T}t"] = r[f"qps_{T}t"] / exact_qT
        r["target_met"] = r[f"recall@{k}"] >= 0.95 and min(r["speedup_1t"], r[f"speedup_{T}t"]) >= 20
    load = os.getloadavg()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} (shared), "
          f"faiss {faiss.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"n={args.n}, dim={args.dim}, queries={nq}, k={k}; peak RSS {peak:.0f} MiB\n")
    print(f"| index | params | build s | index MiB | RSS +MiB | recall@{k} | QPS 1 thread | QPS {T} threads "
          f"| x exact (1t / {T}t) | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = "" if r["rss_added_mib"] is None else f"{r['rss_added_mib']:.0f}"
        print(f"| {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['index_mib']:.0f} | {rss} "
              f"| {r[f'recall@{k}']:.3f} | {r['qps_1t']:.0f} | {r[f'qps_{T}t']:.0f} "
              f"| {r['speedup_1t']:.0f} / {r[f'speedup_{T}t']:.0f} | {'yes' if r['target_met'] else 'no'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "loadavg_end": load,
                    "faiss": faiss.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "generator": "retrieval.index.clustered_embeddings", "peak_rss_mib": peak, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
