"""POST /search end to end under a bounded load: p50 / p99 per pipeline stage and QPS.

    .venv/bin/python benchmarks/bench_search.py [--profile demo] [--clients 1,2,4] [--requests 300]
                                                [--synthetic 1000000] [--skip-demo] [--rerank none|point|list]

Scenarios, each a server process (uvicorn, 127.0.0.1) driven by N concurrent httpx clients (each
N of `--clients`, one run each) sending a fixed number of requests (test-split query photos of the profile's query_sets,
with their text when they have one; `--warmup` requests first, not counted):
  (a) demo       the lineage's published index over the demo catalog (`pailitao item_embeddings`
                 and `pailitao ann_index` on the profile must have run) with its served model;
  (b) synthetic  the same model and queries against an index of `--synthetic` items made by
                 retrieval.index.clustered_embeddings at the served dim (auto kind: IVF-PQ + SQ8 at
                 1M) with synthetic item metadata. Its results are meaningless; its latency is not.
Stage latencies are the server's own (the response's latency_ms); `client` is the round trip.
serving.candidates (50) ANN candidates go through `--rerank` (none: the embedding order; list: the
chunkwise reranker_model, all 5 chunks of a query in one batch; point: reranker_pointwise).
Writes benchmarks/results/search.json and prints a markdown table.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_ann.py: spinning OpenMP threads on a shared box

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STAGES = ("decode", "embed", "ann", "rerank", "total")


def serve(args) -> None:
    """Server role: the app over one index directory (the benchmark starts it as a subprocess)."""
    import uvicorn

    from core.config import deep_merge, load_params
    from retrieval.pipeline import build_searcher
    from serving.app import create_app

    params = load_params(args.profile, {"serving": {"concurrency": args.concurrency, "queue": 64, "timeout_s": 30,
                                                    "rerank": args.rerank},
                                        "ab": {"event_log": None}, **({"workdir": args.workdir} if args.workdir else {})})
    if args.index:  # a synthetic index was not built by this model: skip the model/index guard
        params = deep_merge(params, {"serving": {"require_model_match": False}})
    searcher = build_searcher(params, embeddings_dir=args.embeddings, index_dir=args.index)
    uvicorn.run(create_app(params, {"default": searcher}), host="127.0.0.1", port=args.port, log_level="warning")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_index(n: int, dim: int, params: dict, root: Path) -> tuple[Path, Path, dict]:
    """An item_embeddings-like directory (items.parquet) and a published index of n synthetic items."""
    from retrieval import index as ix, index_store

    emb_dir, index_dir = root / "item_embeddings", root / "ann_index"
    emb_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    emb = ix.clustered_embeddings(n, dim, seed=0)
    cats = np.array([f"synthetic/c{i:03d}" for i in range(500)])
    ids = np.char.add("syn-", np.arange(n).astype(str))
    pd.DataFrame({"image_id": ids, "item_id": ids, "title": np.char.add("synthetic item ", np.arange(n).astype(str)),
                  "category": cats[np.arange(n) % 500], "group_id": ids, "image": None}
                 ).to_parquet(emb_dir / "items.parquet", index=False)
    gen_s = time.perf_counter() - t0
    meta = index_store.build_and_publish(index_dir, emb, ids, params["ann_index"], model_version="synthetic")
    print(f"synthetic: {n} x {dim} generated in {gen_s:.0f} s, {meta['kind']} built in {meta['build_seconds']:.0f} s, "
          f"recall@10 {meta['recall']:.3f}", flush=True)
    return emb_dir, index_dir, meta


def queries(params: dict, limit: int) -> list[tuple[bytes | None, str | None]]:
    from data.queries import image_queries
    from core.config import Paths

    root = Paths.from_params(params).asset("query_sets")
    q = image_queries(pd.read_parquet(root / "queries.parquet"))   # the photo queries measured before
    q = q[q["split"] == "test"].sample(frac=1.0, random_state=0).head(limit)
    return [((root / r.image).read_bytes() if isinstance(r.image, str) else None,
             r.text if isinstance(r.text, str) else None) for r in q.itertuples()]


def start_server(args, port: int, index: Path | None = None, embeddings: Path | None = None) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, __file__, "--serve", "--profile", args.profile, "--port", str(port),
           "--concurrency", str(args.concurrency), "--rerank", args.rerank]
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    if index:
        cmd += ["--index", str(index), "--embeddings", str(embeddings)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def load(url: str, qs: list, clients: int, total: int, warmup: int) -> dict:
    """`clients` threads share a counter up to warmup + total requests; the first `warmup` are dropped."""
    import httpx

    lock, nxt, rows = threading.Lock(), [0], []

    def client():
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= warmup + total:
                    return
                image, text = qs[i % len(qs)]
                t0 = time.perf_counter()
                r = c.post("/search", files={"image": ("q.jpg", image, "image/jpeg")} if image else None,
                           data={"text": text} if text else {"k": "10"})
                ms = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    lat = r.json()["latency_ms"] if r.status_code == 200 else {}
                    rows.append({"status": r.status_code, "client": ms, "end": time.perf_counter(), **lat})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    df = pd.DataFrame(rows)
    ok = df[df["status"] == 200]
    span = df["end"].max() - t0 if len(df) else float("nan")
    out = {"requests": len(df), "errors": int((df["status"] != 200).sum()), "qps": round(len(ok) / span, 2)}
    for col in (*STAGES, "client"):
        out[col] = {"p50": round(float(ok[col].quantile(0.5)), 2), "p99": round(float(ok[col].quantile(0.99)), 2)}
    return out


def markdown(results: dict) -> str:
    head = "| scenario | items | index | requests | errors | QPS | " + " | ".join(
        f"{s} p50 / p99 ms" for s in (*STAGES, "client")) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['items']:,} | {r['kind']} | {r['requests']} | {r['errors']} | {r['qps']} | "
                     + " | ".join(f"{r[s]['p50']} / {r[s]['p99']}" for s in (*STAGES, "client")) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--clients", default="1,2,4", help="comma-separated concurrent client counts, one run each")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2, help="serving.concurrency of the server")
    ap.add_argument("--synthetic", type=int, default=1_000_000, help="items of the synthetic index (0 = skip)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/search.json"))
    ap.add_argument("--rerank", default="none", choices=("none", "point", "list"),
                    help="serving.rerank of the server (list / point need the lineage's reranker assets)")
    ap.add_argument("--workdir", help="the lineage's workdir (default params.yaml's)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--embeddings", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)

    from core.config import Paths, load_params
    from retrieval import index_store
    params = load_params(args.profile, {"workdir": args.workdir} if args.workdir else None)
    qs = queries(params, 500)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_search-") as tmp:
        scenarios = []
        if not args.skip_demo:
            meta = index_store.load_current(Paths.from_params(params).asset("ann_index")).meta
            scenarios.append(("demo", None, None, meta))
        if args.synthetic:
            scenarios.append((f"synthetic {args.synthetic:,}",
                              *synthetic_index(args.synthetic, params["model"]["served_dim"], params, Path(tmp))))
        for name, emb_dir, index_dir, meta in scenarios:
            port = free_port()
            proc = start_server(args, port, index_dir, emb_dir)
            try:
                for clients in map(int, args.clients.split(",")):
                    print(f"{name}: {args.requests} requests, {clients} clients", flush=True)
                    results[f"{name}, {clients} clients"] = {
                        "items": meta["n"], "kind": meta["kind"], "clients": clients,
                        **load(f"http://127.0.0.1:{port}", qs, clients, args.requests, args.warmup)}
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
    md = markdown(results)
    print(md)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "profile": args.profile, "preset": params["model"]["preset"],
              "served_dim": params["model"]["served_dim"], "candidates": params["serving"]["candidates"],
              "concurrency": args.concurrency, "torch_threads": params["serving"]["torch_threads"],
              "rerank": args.rerank, "results": results, "markdown": md}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
