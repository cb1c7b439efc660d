"""Every embedding model of a lineage beside its floors, on the same unseen test queries, whole
catalog as gallery: thumbnail kNN, BM25 and TF-IDF (evaluation/floors.py), the vision tower alone
(its pooled feature, zero-shot), the base model zero-shot, stage 1, the ID model and the control,
each also as the service ranks queries with words (+ lexical, hybrid: serving.hybrid).
I-HR@1 with a 95% bootstrap interval, C-HR@1 and R@10 per query group (noise level / modality),
and the paired bootstrap of the ID model against the control and against each floor.

    .venv/bin/python benchmarks/bench_pretrained.py --profile demo [--workdir DIR] [--per-level N]

Reads the trained stages' checkpoints (run the lineage first: `make demo` or `pailitao run`).
Prints markdown and writes benchmarks/results/pretrained_<profile>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.schema import Catalog
from evaluation.compare import bootstrap_mean_ci, paired_bootstrap
from evaluation.floors import FLOORS, applicable
from evaluation.metrics import per_query_metrics
from evaluation.retrieval import (cached_gallery, encode_queries, gallery, item_lexical_index, lineage_queries,
                                  query_groups, rank_hybrid, rank_items, ranked_levels)
from core.config import Paths, load_params
from retrieval.lexical import HybridConfig
from retrieval.models import model_fingerprint
from training.backbone import MLLMEmbedder

MODELS = {"base model (zero-shot)": "base_model", "stage 1": "stage1_embedder",
          "control (contrastive)": "baseline_embedder", "ID model (prototypes)": "embedding_model"}


def per_query(ranked: np.ndarray, queries: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    pq = per_query_metrics(ranked_levels(ranked, queries, catalog), queries["n_instance"].to_numpy(),
                           queries["n_concept"].to_numpy(), ks=(1, 10)) * 100   # percent
    return pq.assign(group=query_groups(queries).to_numpy())


def arm_rows(arms: dict[str, pd.DataFrame]) -> list[dict]:
    """Per arm and query group (and all): I-HR@1 with its 95% bootstrap interval, C-HR@1, R@10."""
    rows = []
    for arm, pq in arms.items():
        for group, part in [("all", pq), *pq.groupby("group")]:
            lo_hi = bootstrap_mean_ci(part["I-HR@1"].to_numpy(), n_boot=1000) if len(part) else (np.nan,) * 3
            rows.append({"arm": arm, "group": group, "queries": len(part), "I-HR@1": lo_hi[0],
                         "95% CI": f"[{lo_hi[1]:.1f}, {lo_hi[2]:.1f}]", "C-HR@1": part["C-HR@1"].mean(),
                         "R@10": part["R@10"].mean()})
    return rows


def paired_tests(arms: dict[str, pd.DataFrame], pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired bootstrap of I-HR@1, arm minus the other, on the queries both ranked, per group."""
    tests = []
    for arm, other in pairs:
        a, b = arms[other], arms[arm]
        common = a.index.intersection(b.index)
        for group in ["all", *sorted(set(b.loc[common, "group"]))]:
            idx = common if group == "all" else common[b.loc[common, "group"] == group]
            if len(idx) < 10:
                continue
            r = paired_bootstrap(a.loc[idx, "I-HR@1"].to_numpy(), b.loc[idx, "I-HR@1"].to_numpy(), n_boot=1000)
            tests.append({"arm": arm, "minus": other, "group": group, "queries": len(idx), **{
                k: r[k] for k in ("diff", "ci_low", "ci_high", "p_value") if k in r}})
    return tests


def tower_rank(embedder: MLLMEmbedder, catalog: Catalog, queries: pd.DataFrame, root: Path) -> np.ndarray:
    """The vision tower alone: mean of its pooled feature map, cosine kNN (image queries only)."""
    def feats(files) -> np.ndarray:
        out = []
        for s in range(0, len(files), 64):
            pv = embedder.image_processor([Image.open(f).convert("RGB") for f in files[s:s + 64]])["pixel_values"]
            out.append(embedder.model.pooled_features(pv).mean(1).numpy())
        x = np.concatenate(out)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)

    g = gallery(catalog)
    g_emb = feats([str(catalog.image_file(p)) for p in g["path"]])
    has = applicable("thumbnail_knn", queries)
    ranked = np.full((len(queries), 100), None, dtype=object)
    ranked[has] = rank_items(feats([str(root / p) for p in queries.loc[has, "image"]]), g, g_emb)
    return ranked, has


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--per-level", type=int, default=None, help="at most this many test queries per group")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    params = load_params(args.profile, {"workdir": args.workdir} if args.workdir else None)
    paths = Paths.from_params(params)
    catalog, root, q = lineage_queries(params, "test", args.per_level)
    dim = params["model"]["served_dim"]
    arms, seconds = {}, {}
    lexical, hybrid = item_lexical_index(catalog), HybridConfig.from_params(params)
    for name in FLOORS:
        t0 = time.perf_counter()
        has = applicable(name, q)
        arms[name] = per_query(FLOORS[name](catalog, q, root), q, catalog)[has]
        seconds[name] = time.perf_counter() - t0
    for label, stage in MODELS.items():
        path = paths.asset(stage) / "model"
        if not path.is_dir():
            print(f"(no {stage} checkpoint: skipped)")
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        emb = MLLMEmbedder.from_pretrained(path)
        if stage == "base_model" and hasattr(emb.model, "pooled_features"):
            ranked, has = tower_rank(emb, catalog, q, root)
            arms["vision tower alone (zero-shot)"] = per_query(ranked, q, catalog)[has]
        g, g_emb = cached_gallery(paths.gallery_cache, model_fingerprint(path), lambda: emb, catalog, dim)
        q_emb = encode_queries(emb, q, root, dim)
        arms[label] = per_query(rank_items(q_emb, g, g_emb), q, catalog)
        seconds[label] = time.perf_counter() - t0
        if hybrid.enabled:   # what the service returns: + the lexical matches of the words
            words = applicable("tfidf", q)
            arms[f"{label} + lexical (hybrid)"] = per_query(
                rank_hybrid(q_emb, q, g, g_emb, lexical, hybrid), q, catalog)[words]
    rows = arm_rows(arms)
    table = pd.DataFrame(rows)
    m = params["model"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; profile "
          f"{params['profile']}, preset {m['preset']}, base {m.get('base')}, served_dim {dim}; "
          f"{len(q)} test queries, gallery {len(gallery(catalog))} catalog images\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))
    ident, served = "ID model (prototypes)", "ID model (prototypes) + lexical (hybrid)"
    pairs = [(ident, other) for other in arms if other not in (ident, served)] if ident in arms else []
    pairs += [(served, other) for other in ("tfidf", "bm25", ident)] if served in arms else []
    tests = paired_tests(arms, pairs)
    if tests:
        print("\nPaired bootstrap, I-HR@1 (arm minus the other, same queries):\n")
        print(pd.DataFrame(tests).to_markdown(index=False, floatfmt=".2f"))
    print("\n" + " | ".join(f"{k}: {v:.0f} s" for k, v in seconds.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pretrained_{params['profile']}.json"), "w") as f:
        json.dump({"table": rows, "tests": tests, "seconds": seconds, "queries": len(q)}, f, indent=2, default=float)


if __name__ == "__main__":
    main()
