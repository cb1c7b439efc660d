"""Hybrid search (retrieval/lexical.py): the embedding's candidates merged with TF-IDF matches of
the words, swept over serving.hybrid.lexical_weight on the VALIDATION queries (the weight in
params.yaml is chosen here, never on test), for one model of a lineage, beside the TF-IDF floor
alone. Per query group; only queries with words change.

    .venv/bin/python benchmarks/bench_hybrid.py --profile demo [--workdir DIR] [--model embedding_model]

Prints markdown and writes benchmarks/results/hybrid_<profile>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace

import pandas as pd

from evaluation.floors import tfidf
from evaluation.retrieval import (cached_gallery, encode_queries, item_lexical_index, lineage_queries, query_groups,
                                  rank_hybrid, ranked_levels)
from evaluation.metrics import per_query_metrics
from core.config import Paths, load_params
from retrieval.lexical import HybridConfig
from retrieval.models import model_fingerprint
from training.backbone import MLLMEmbedder

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--model", default="embedding_model", help="a lineage stage with a checkpoint")
    ap.add_argument("--split", default="val")
    ap.add_argument("--per-level", type=int, default=300, help="at most this many queries per group")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    params = load_params(args.profile, {"workdir": args.workdir} if args.workdir else None)
    paths = Paths.from_params(params)
    catalog, root, q = lineage_queries(params, args.split, args.per_level)
    path = paths.asset(args.model) / "model"
    dim = params["model"]["served_dim"]
    emb = MLLMEmbedder.from_pretrained(path)
    g, g_emb = cached_gallery(paths.gallery_cache, model_fingerprint(path), lambda: emb, catalog, dim)
    q_emb = encode_queries(emb, q, root, dim)
    lexical, cfg = item_lexical_index(catalog), HybridConfig.from_params(params)
    groups = query_groups(q).to_numpy()

    def scores(ranked) -> dict:
        pq = per_query_metrics(ranked_levels(ranked, q, catalog), q["n_instance"].to_numpy(),
                               q["n_concept"].to_numpy(), ks=(1, 10)) * 100
        pq = pq.assign(group=groups)
        return {**pq.groupby("group")["I-HR@1"].mean().round(2).to_dict(), "all": round(pq["I-HR@1"].mean(), 2)}

    rows = [{"arm": "TF-IDF floor (words only)", **scores(tfidf(catalog, q, root))}]
    for w in WEIGHTS:   # one weight for every query here; params keep the best with and without a photo
        mark = [name for name, v in (("photo", cfg.weight), ("text-only", cfg.text_only_weight)) if v == w]
        rows.append({"arm": f"{args.model} + lexical, weight {w}" + (f" (params: {', '.join(mark)})" if mark else ""),
                     **scores(rank_hybrid(q_emb, q, g, g_emb, lexical, replace(cfg, weight=w, text_only_weight=w)))})
    table = pd.DataFrame(rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; profile {params['profile']}, model "
          f"{args.model}, split {args.split}, {len(q)} queries, lexical candidates {cfg.candidates}; "
          "I-HR@1 per group (the floor has nothing for image-only rows without words)\n")
    print(table.to_markdown(index=False, floatfmt=".1f"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"hybrid_{params['profile']}.json"), "w") as f:
        json.dump({"rows": rows, "queries": len(q), "split": args.split, "model": args.model}, f, indent=2,
                  default=float)


if __name__ == "__main__":
    main()
