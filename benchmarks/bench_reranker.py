"""Reranker ablation and efficiency on unseen test instances (PAPER "Reranker"), 50 candidates from
the served (ID) embedder, all rows in one run:

    .venv/bin/python benchmarks/bench_reranker.py [--profile demo] [--workdir W] [--per-level 150]
        [--reuse] [--variants full pointwise ...] [--set reranker.steps=300 ...]
    .venv/bin/python benchmarks/bench_reranker.py --efficiency-only [--queries 40]

Quality rows: embedding order; two baselines (a random order of the candidates; the paper's merge
with an uninformed absolute score, i.e. a random choice among the round-robin chunk heads);
chunkwise only (pairwise + next-token loss, global sort by s); + NULL loss (sort by s - s_null);
+ absolute score (sort by r); + hybrid merge (the paper's full method); + fusion with the retrieval
score (retrieval/fusion.py, not the paper's); the scorer with matching features; pointwise, alone
and fused. Each row is calibrated and thresholded on validation by itself. Metrics: I-HR@1/5/10
with a bootstrap interval and paired bootstraps against embedding order and random order,
C-HR@1/5/10, instance / concept P/R/F1 with intervals (val-split thresholds).
Efficiency: per query, all of its prompts in one batch (as served): forward passes, wall ms/query,
candidate pairs/s, pointwise vs chunkwise on the same model size and hardware, each with and without
the prefix key/value cache (a query's shared prompt prefix computed once), interleaved.
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

from retrieval.calibration import expected_calibration_error
from evaluation.compare import bootstrap_mean_ci, paired_bootstrap
from evaluation.metrics import per_query_metrics
from core.config import Paths, deep_merge, load_params, set_overrides
from pailitao.stages import reranking as rs
from retrieval.merge import assign_chunks, hybrid_merge
from retrieval.rerank import Ranked, load_reranker

COLS = ["I-HR@1", "I-HR@5", "I-HR@10", "C-HR@1", "C-HR@5", "C-HR@10"]
VARIANTS = {   # name -> (mode, reranker overrides)
    "chunkwise_only": ("list", {"null_weight": 0.0, "absolute": False}),
    "null": ("list", {"absolute": False}),
    "full": ("list", {}),
    "full_interact": ("list", {"scorer_input": "interact"}),   # not the paper's: matching features
    "pointwise": ("point", {}),
}
ROWS = {   # variant -> (row, merge | "fusion" | None: as loaded), all from one model pass
    "chunkwise_only": [("chunkwise only (sort by s)", "s")],
    "null": [("+ NULL loss (sort by s - s_null)", "s_minus_null")],
    "full": [("+ absolute score (sort by r)", "r"), ("+ hybrid merge (the paper's full method)", "hybrid"),
             ("+ fusion with the retrieval score (ours)", "fusion")],
    "full_interact": [("hybrid merge, scorer with |z0 - zi|, z0 * zi", "hybrid"),
                      ("scorer with |z0 - zi|, z0 * zi + fusion", "fusion")],
    "pointwise": [("pointwise", None), ("pointwise + fusion", "fusion")],
}
EMBEDDING, RANDOM = "embedding order", "random order"


class MemoScores:
    """Memoise a model's score() per prompt, so several merges of the same chunks cost one pass."""

    def __init__(self, model):
        self.model, self.inner, self.memo = model, model.score, {}

    def __call__(self, queries, candidates, batch_size=16, **kwargs):
        key = lambda q, d: (str(q[0]), q[1], tuple(str(x[0]) for x in d))  # noqa: E731
        todo = [(q, d) for q, d in zip(queries, candidates) if key(q, d) not in self.memo]
        if todo:
            for (q, d), r in zip(todo, self.inner([t[0] for t in todo], [t[1] for t in todo], batch_size, **kwargs)):
                self.memo[key(q, d)] = r
        return [self.memo[key(q, d)] for q, d in zip(queries, candidates)]


def test_set(params: dict, per_level: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(test queries, their top-N candidates from the served embedder with levels, gallery)."""
    from data.queries import image_queries
    from data.schema import Catalog
    from evaluation.retrieval import encode_queries
    from retrieval.models import load_embedder, resolve_model
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


class RandomOrder:
    """Baseline: the candidates in a seeded random order."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def rank_many(self, queries, docs, first_stage=None):
        return [Ranked(self.rng.permutation(len(d)), np.zeros(len(d)), np.zeros(len(d)), np.zeros(len(d)), 0)
                for d in docs]


class RandomChunkHeads(RandomOrder):
    """Baseline: the paper's merge with an uninformed absolute score: retrieval order inside each
    round-robin chunk, the next head drawn at random (what a listwise reranker whose r carries
    nothing does)."""

    def __init__(self, chunk_size: int, seed: int = 0):
        super().__init__(seed)
        self.m = chunk_size

    def rank_many(self, queries, docs, first_stage=None):
        out = []
        for d in docs:
            chunks = assign_chunks(len(d), self.m, "round_robin")
            order = hybrid_merge(chunks, [-c.astype(float) for c in chunks], [self.rng.random(len(c)) for c in chunks])
            out.append(Ranked(order, np.zeros(len(d)), np.zeros(len(d)), np.zeros(len(d)), 0))
        return out


def quality(params, args, out_root) -> list[dict]:
    paths = Paths.from_params(params)
    root = paths.asset("query_sets")
    q, cands, gallery = test_set(params, args.per_level)
    val_q = pd.read_parquet(paths.asset("reranker_dataset") / "val_queries.parquet")
    val_c = pd.read_parquet(paths.asset("reranker_dataset") / "val_candidates.parquet")
    rows, hits = [], {}
    n_inst, n_conc = q["n_instance"].to_numpy(), q["n_concept"].to_numpy()

    def add(name, ranker, thresholds, extra=None):
        t0 = time.perf_counter()
        run = rs.run_reranker(ranker, q, root, cands, gallery)
        rep = rs.report(run, q)
        per_q = per_query_metrics(run["levels"], n_inst, n_conc)
        hits[name] = per_q["I-HR@1"].to_numpy()
        pr = {k: v["all"] for k, v in rs.prf_by_group(run, thresholds or {"instance": 1.0, "concept": 1.0},
                                                          q["level"].to_numpy()).items()}
        if thresholds is None:   # a baseline without scores: no P / R / F1
            pr = {k: {"value": np.nan, "ci_low": np.nan, "ci_high": np.nan} for k in pr}
        ci = bootstrap_mean_ci(hits[name])
        row = {"row": name, **{c: rep.loc["all", c] for c in COLS},
               "I-HR@1 95% CI": f"[{100 * ci[1]:.1f}, {100 * ci[2]:.1f}]",
               **{f"{lv} I-HR@1": rep.loc[lv, "I-HR@1"] for lv in ("clean", "mild", "hard") if lv in rep.index},
               **{k: v["value"] for k, v in pr.items()},
               "instance F1 95% CI": f"[{pr['instance_F1']['ci_low']:.1f}, {pr['instance_F1']['ci_high']:.1f}]",
               "ECE calibrated": ece(run["p_instance"], run),
               "passes/query": run["forward_passes"] / max(len(q), 1), "eval_s": round(time.perf_counter() - t0, 1),
               **(extra or {})}
        if name != EMBEDDING:
            for ref in (EMBEDDING, RANDOM):
                t = paired_bootstrap(hits[ref], hits[name], seed=0)
                row[f"- {ref}"] = f"{100 * t['diff']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}], p {t['p_value']:.2f}"
            row["instance F1 - embedding"] = pr["instance_F1"]["value"] - rows[0]["instance_F1"]
        rows.append(row)
        print(pd.DataFrame([row]).to_markdown(index=False, floatfmt=".2f"), flush=True)

    _, val_thr = rs.prf(rs.run_reranker(None, val_q, root, val_c, gallery))
    add(EMBEDDING, None, val_thr)
    add(RANDOM, RandomOrder(), None)
    add("random chunk head (r uninformed)", RandomChunkHeads(params["reranker"]["chunk_size"]), None)
    for name, (mode, over) in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        out = out_root / name
        vparams = deep_merge(params, {"reranker": over})
        if not (args.reuse and (out / "model").is_dir()):
            res = rs.train_reranker(vparams, mode, out, stage=f"bench_reranker_{name}", register=False)
            print(f"trained {name}: {res.metrics} {res.info.get('fusion')}", flush=True)
        cfg = vparams["reranker"]
        ranker = load_reranker(out / "model", cfg)
        ranker.model.score = MemoScores(ranker.model)   # every row of a variant: one model pass
        for label, how in ROWS[name]:
            if how not in (None, "fusion"):
                ranker.merge_how = how
            # each row's own calibration and thresholds on validation (the checkpoint's are the served row's)
            val_run, _, fusion = rs.validate(ranker, val_q, root, val_c, gallery, cfg["calibration"], how == "fusion")
            extra = {"fusion": dict(zip(fusion.names, np.round(fusion.coef, 2))) if fusion else None}
            add(label, ranker, rs.prf(val_run)[1], extra)
    return rows


def efficiency(params, args, out_root) -> list[dict]:
    """ms/query with each query's prompts in one batch, pointwise and chunkwise, each with and without
    the prefix key/value cache (the query's prompt prefix computed once), interleaved."""
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
    # (row name, reranker, prefix cache); the first row (pointwise, whole prompts) is the baseline
    variants = [(f"{name}, {'with' if cache else 'without'} prefix cache", r, cache)
                for name, r in rankers.items() for cache in (False, True)]
    for _, r, cache in variants:   # warm-up both paths and fill the catalog image cache (static catalog)
        r.prefix_cache = cache
        for qd, d in queries[:3]:
            r.rank(qd, d)
        for qd, d in queries:
            r.model._pixels([(x[0], None) for x in d])
    times = {v[0]: [] for v in variants}
    passes = {}
    with torch.inference_mode():
        for qd, d in queries:
            for name, r, cache in variants:
                r.prefix_cache = cache
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
    for i, row in enumerate(rows):
        row["speed-up vs pointwise"] = base / row["ms/query mean"]
        # the same mode without the cache is the row before (variants alternate without / with)
        row["prefix cache speed-up"] = rows[i - i % 2]["ms/query mean"] / row["ms/query mean"]
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
    ap.add_argument("--workdir", help="the lineage (default: params workdir)")
    ap.add_argument("--set", action="append", default=[], help="key.path=value (YAML-typed), e.g. reranker.steps=300")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.profile, deep_merge({"workdir": args.workdir} if args.workdir else {},
                                                  set_overrides(args.set)))
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
