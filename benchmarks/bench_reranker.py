"""Reranker ablation and efficiency on unseen test instances (PAPER "Reranker"), 50 candidates from
the served (ID) embedder, all rows in one run:

    .venv/bin/python benchmarks/bench_reranker.py [--profile demo] [--per-level 150] [--reuse]
    .venv/bin/python benchmarks/bench_reranker.py --efficiency-only [--queries 40]

Quality rows: embedding order; chunkwise only (pairwise + next-token loss, global sort by s);
+ NULL loss (sort by s - s_null); + absolute score (sort by r); + hybrid merge (the paper's full
method), each for contiguous and round-robin chunk assignment; pointwise. Metrics: I-HR@1/5/10,
C-HR@1/5/10 and instance / concept P/R/F1 at thresholds chosen on validation (val split).
Efficiency: per query, all of its prompts in one batch (as served): forward passes, wall ms/query,
candidate pairs/s, pointwise vs chunkwise on the same model size and hardware, interleaved.
Needs the lineage through item_embeddings (`make demo` or `pailitao run`); builds reranker_dataset
when missing. Prints markdown; JSON into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import torch

from evaluation.calibration import expected_calibration_error
from pailitao.config import Paths, deep_merge, load_params
from retrieval import rerank_stages as rs
from retrieval.rerank import load_reranker

COLS = ["I-HR@1", "I-HR@5", "I-HR@10", "C-HR@1", "C-HR@5", "C-HR@10"]
VARIANTS = {   # name -> (mode, reranker overrides)
    "chunkwise_only": ("list", {"null_weight": 0.0, "absolute": False}),
    "null": ("list", {"absolute": False}),
    "full": ("list", {}),
    "pointwise": ("point", {}),
    "full_interact": ("list", {"scorer_input": "interact"}),   # not the paper's: matching features
}


class MemoScores:
    """Memoise a model's score() per prompt, so several merges of the same chunks cost one pass."""

    def __init__(self, model):
        self.model, self.inner, self.memo = model, model.score, {}

    def __call__(self, queries, candidates, batch_size=16):
        key = lambda q, d: (str(q[0]), q[1], tuple(str(x[0]) for x in d))  # noqa: E731
        todo = [(q, d) for q, d in zip(queries, candidates) if key(q, d) not in self.memo]
        if todo:
            for (q, d), r in zip(todo, self.inner([t[0] for t in todo], [t[1] for t in todo], batch_size)):
                self.memo[key(q, d)] = r
        return [self.memo[key(q, d)] for q, d in zip(queries, candidates)]


def test_set(params: dict, per_level: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(test queries, their top-N candidates from the served embedder with levels, gallery)."""
    from data.queries import image_queries
    from data.schema import Catalog
    from evaluation.retrieval import encode_queries
    from retrieval.pipeline import load_embedder, resolve_model
    from training import rerank_data as rd

    paths = Paths.from_params(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    _, gallery, g_emb, _ = rs.served_gallery(params)
    qs = image_queries(pd.read_parquet(paths.asset("query_sets") / "queries.parquet"))
    q = qs[qs["split"] == "test"].groupby("level", group_keys=False).head(per_level).reset_index(drop=True)
    emb = encode_queries(load_embedder(resolve_model(params)), q, paths.asset("query_sets"), params["model"]["served_dim"])
    cands = rd.label(rd.retrieve(emb, gallery, g_emb, q["query_id"], params["serving"]["candidates"]), q, catalog.items)
    return q, cands, gallery


def ece(p: np.ndarray, run: dict) -> float:
    """Test-set ECE of a P(instance) (the calibrator was fitted on validation)."""
    filled = run["levels_by_rank"] < 9
    return 100 * expected_calibration_error(p[filled].clip(0, 1), run["levels_by_rank"][filled] == 0)


def quality(params, args, out_root) -> list[dict]:
    paths = Paths.from_params(params)
    root = paths.asset("query_sets")
    q, cands, gallery = test_set(params, args.per_level)
    val_q = pd.read_parquet(paths.asset("reranker_dataset") / "val_queries.parquet")
    val_c = pd.read_parquet(paths.asset("reranker_dataset") / "val_candidates.parquet")
    rows = []

    def add(name, ranker, thresholds, extra=None):
        t0 = time.perf_counter()
        run = rs.run_reranker(ranker, q, root, cands, gallery)
        rep = rs.report(run, q).loc["all"]
        pr, _ = rs.prf(run, thresholds)
        row = {"row": name, **{c: rep[c] for c in COLS}, **pr, "hard I-HR@1": rs.report(run, q).loc["hard", "I-HR@1"],
               "ECE raw": ece(run["p_raw"], run), "ECE calibrated": ece(run["p_instance"], run),
               "passes/query": run["forward_passes"] / max(len(q), 1), "eval_s": round(time.perf_counter() - t0, 1),
               **(extra or {})}
        rows.append(row)
        print(pd.DataFrame([row]).to_markdown(index=False, floatfmt=".2f"), flush=True)

    _, val_thr = rs.prf(rs.run_reranker(None, val_q, root, val_c, gallery))
    add("embedding order (ID embedder)", None, val_thr)
    for name, (mode, over) in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        out = out_root / name
        vparams = deep_merge(params, {"reranker": over})
        if not (args.reuse and (out / "model").is_dir()):
            res = rs.train_reranker(vparams, mode, out, stage=f"bench_reranker_{name}", register=False)
            print(f"trained {name}: {res.metrics}", flush=True)
        thr = json.loads((out / "model" / rs.THRESHOLD_FILE).read_text())
        cfg = vparams["reranker"]
        ranker = load_reranker(out / "model", cfg)
        if mode == "point":
            add("pointwise", ranker, thr)
            continue
        ranker.model.score = MemoScores(ranker.model)
        if name == "chunkwise_only":
            ranker.merge_how = "s"
            add("chunkwise only (sort by s)", ranker, thr)
        elif name == "null":
            ranker.merge_how = "s_minus_null"
            add("+ NULL loss (sort by s - s_null)", ranker, thr)
        elif name == "full_interact":
            ranker.merge_how = "hybrid"
            add("+ hybrid merge, scorer with |z0 - zi|, z0 * zi (not the paper's)", ranker, thr)
        else:
            for assign in ("contiguous", "round_robin"):
                ranker.assign = assign
                ranker.merge_how = "r"
                add(f"+ absolute score (sort by r), {assign}", ranker, thr)
                ranker.merge_how = "hybrid"
                add(f"+ hybrid merge, {assign}", ranker, thr)
    return rows


def efficiency(params, args, out_root) -> list[dict]:
    """ms/query with each query's prompts in one batch, pointwise and chunkwise interleaved."""
    q, cands, gallery = test_set(params, max(1, args.queries // 3 + 1))
    q = q.head(args.queries)
    root = Paths.from_params(params).asset("query_sets")
    docs = rs.docs_for(cands, gallery)
    cfg = params["reranker"]
    rankers = {}
    for name in ("pointwise", "full"):
        r = load_reranker(out_root / name / "model", {**cfg, "batch_size_infer": 10**6, "image_cache_mb": 10**6})
        rankers["pointwise" if name == "pointwise" else "chunkwise (hybrid)"] = r
    queries = [(rs.query_doc(row, root), docs[row["query_id"]]) for _, row in q.iterrows()]
    for r in rankers.values():     # warm-up and fill the catalog image cache (static catalog)
        for qd, d in queries[:3]:
            r.rank(qd, d)
        for qd, d in queries:
            r.model._pixels([(x[0], None) for x in d])
    times = {k: [] for k in rankers}
    passes = {}
    with torch.inference_mode():
        for qd, d in queries:
            for name, r in rankers.items():
                t0 = time.perf_counter()
                ranked = r.rank(qd, d)
                times[name].append(time.perf_counter() - t0)
                passes[name] = ranked.forward_passes
    rows = []
    n_c = params["serving"]["candidates"]
    for name, ts in times.items():
        ts = np.array(ts) * 1e3
        rows.append({"reranker": name, "forward passes/query": passes[name], "ms/query p50": np.median(ts),
                     "ms/query mean": ts.mean(), "ms/query p95": np.percentile(ts, 95),
                     "pairs/s": n_c / (ts.mean() / 1e3)})
    base = rows[0]["ms/query mean"]
    for row in rows:
        row["speed-up vs pointwise"] = base / row["ms/query mean"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--per-level", type=int, default=150, help="test queries per noise level")
    ap.add_argument("--queries", type=int, default=40, help="queries timed for efficiency")
    ap.add_argument("--reuse", action="store_true", help="keep already trained variants")
    ap.add_argument("--efficiency-only", action="store_true")
    ap.add_argument("--variants", nargs="*", help=f"train / evaluate only these of {list(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.profile)
    out_root = Paths.from_params(params).processed / "bench_reranker"
    if not (Paths.from_params(params).asset("reranker_dataset") / "meta.json").is_file():
        rs.reranker_dataset(params)
    result = {"profile": args.profile, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": args.threads, "candidates": params["serving"]["candidates"],
              "chunk_size": params["reranker"]["chunk_size"], "preset": params["model"]["preset"]}
    if not args.efficiency_only:
        result["quality"] = quality(params, args, out_root)
        print("\n" + pd.DataFrame(result["quality"]).to_markdown(index=False, floatfmt=".2f"))
    if not args.variants:
        result["efficiency"] = efficiency(params, args, out_root)
        print("\n" + pd.DataFrame(result["efficiency"]).to_markdown(index=False, floatfmt=".2f"))
    os.makedirs(args.out, exist_ok=True)
    name = "reranker_efficiency.json" if args.efficiency_only else \
        f"reranker{'-' + '-'.join(args.variants) if args.variants else ''}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=2, default=float)


if __name__ == "__main__":
    main()
