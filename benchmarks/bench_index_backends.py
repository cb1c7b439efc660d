"""faiss vs Milvus (milvus-lite, embedded) as the ann_index backend, side by side in one run:
build + publish seconds, search QPS and recall@10 against exact search, through the same
interface the lineage and the service use (retrieval.index_store.build_and_publish, load_current,
Loaded.search).

    .venv/bin/python benchmarks/bench_index_backends.py [--n 100000] [--dim 128] [--queries 1000]

Synthetic clustered unit vectors (retrieval.index.clustered_embeddings) stand in for item
embeddings; queries are held-out noisy copies. faiss picks its kind by size (ann_index.kind auto:
HNSW at 100k); Milvus uses ann_index.milvus.index_type from params.yaml (FLAT: exact, the
only index milvus-lite builds). QPS is one query per call, as the service searches. Writes
benchmarks/results/index_backends.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from core.config import load_params
from retrieval import index_store
from retrieval.index import clustered_embeddings


def exact_top(emb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    return index.search(q, k)[1]


def run(backend: str, emb: np.ndarray, ids: np.ndarray, q: np.ndarray, truth: np.ndarray, cfg: dict,
        root: Path, k: int) -> dict:
    cfg = {**cfg, "backend": backend}
    t0 = time.perf_counter()
    meta = index_store.build_and_publish(root, emb, ids, cfg)
    build = time.perf_counter() - t0
    loaded = index_store.load_current(root)
    pos = {s: i for i, s in enumerate(ids)}
    hits, t0 = 0, time.perf_counter()
    for row, want in zip(q, truth):
        _, got = loaded.search(row[None, :], k)
        hits += len({pos[g] for g in got[0] if g in pos} & set(want.tolist()))
    seconds = time.perf_counter() - t0
    return {"backend": backend, "kind": meta["kind"], "build_publish_s": round(build, 1),
            "qps": round(len(q) / seconds, 1), "recall_at_10": round(hits / (len(q) * k), 4),
            "check_recall": round(meta["recall"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    x = clustered_embeddings(args.n + args.queries, args.dim, clusters=max(10, args.n // 5), seed=0)
    emb, q = np.ascontiguousarray(x[:args.n]), np.ascontiguousarray(x[args.n:])
    ids = np.array([f"img{i}" for i in range(args.n)])
    truth = exact_top(emb, q, args.k)
    cfg = load_params("demo")["ann_index"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("faiss", "milvus"):
            rows.append(run(backend, emb, ids, q, truth, cfg, Path(tmp) / backend, args.k))
            print(rows[-1], flush=True)
    out = {"n": args.n, "dim": args.dim, "queries": args.queries, "machine": platform.platform(), "rows": rows}
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/index_backends.json").write_text(json.dumps(out, indent=2))
    print(f"\n{args.n:,} items x {args.dim}, {args.queries} queries, recall@{args.k} vs exact search\n")
    print("| backend | index | build + publish s | QPS (1 query per call) | recall@10 | recall check |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['kind']} | {r['build_publish_s']} | {r['qps']} | {r['recall_at_10']} | "
              f"{r['check_recall']} |")


if __name__ == "__main__":
    main()
