"""ID-prototype embedding (treatment) vs contrastive control (same backbone, same budget) on the
unseen test instances of a catalog, per noise level; plus training throughput and peak memory.

    .venv/bin/python benchmarks/bench_embedding.py [--profile demo] [--preset small] [--steps N]

Runs the data stages if their outputs are missing, then stage1_embedder -> semantic_prototypes ->
embedding_model and baseline_embedder with the profile's params (MLflow runs in the configured
store), then evaluates both models on every test query against the whole catalog. Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import pandas as pd

from data.schema import Catalog
from evaluation.retrieval import encode_gallery, evaluate
from pailitao.lineage import domain_stages
from core.config import Paths, deep_merge, load_params, set_overrides
from training.backbone import MLLMEmbedder

COLS = ["I-HR@1", "I-HR@10", "R@1", "R@10", "mAP@R"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--preset", default=None, help="model preset override (tiny / small)")
    ap.add_argument("--steps", type=int, default=None, help="stage1_steps = stage3_steps override")
    ap.add_argument("--out", default="benchmarks/results", help="where the JSON result goes")
    ap.add_argument("--reuse", nargs="*", default=[], help="model stages whose existing output is kept")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="params overrides, e.g. margin.margin_warmup=0.3 (values parsed as YAML)")
    args = ap.parse_args()
    over = {}
    if args.preset:
        over["model"] = {"preset": args.preset}
    if args.steps:
        over["train"] = {"stage1_steps": args.steps, "stage3_steps": args.steps}
    params = load_params(args.profile, deep_merge(over, set_overrides(args.set)))
    paths = Paths.from_params(params)
    for name, fn in domain_stages("data").items():
        if not (paths.asset(name) / "meta.json").is_file():
            fn(params)
    timings = {}
    for name, fn in domain_stages("embedding").items():
        if name in args.reuse and (paths.asset(name) / "meta.json").is_file():
            continue
        t0 = time.perf_counter()
        res = fn(params)
        timings[name] = {"seconds": round(time.perf_counter() - t0, 1),
                         **{k: res.metrics[k] for k in ("samples_per_second", "steps", "samples", "train_seconds")
                            if k in res.metrics}}
    peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    catalog = Catalog.load(paths.asset("validated_catalog"))
    qroot = paths.asset("query_sets")
    queries = pd.read_parquet(qroot / "queries.parquet")
    test = queries[queries["split"] == "test"].reset_index(drop=True)
    dim = params["model"]["served_dim"]
    reports = {}
    for arm, stage in (("control (contrastive)", "baseline_embedder"), ("treatment (ID prototypes)", "embedding_model"),
                       ("stage 1 only", "stage1_embedder")):
        model = MLLMEmbedder.from_pretrained(paths.asset(stage) / "model")
        t0 = time.perf_counter()
        reports[arm] = evaluate(model, catalog, test, qroot, dim, gallery_cache=encode_gallery(model, catalog, dim))
        timings[f"eval {stage}"] = {"seconds": round(time.perf_counter() - t0, 1)}
    m = params["model"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; profile={params['profile']} "
          f"preset={m['preset']} served_dim={dim} batch={params['train']['batch_size']} "
          f"stage1_steps={params['train']['stage1_steps']} stage3_steps={params['train']['stage3_steps']}; "
          f"test queries={len(test)} gallery={len(catalog.ok_images)} images\n")
    rows = []
    for arm, rep in reports.items():
        for level, r in rep.iterrows():
            rows.append({"arm": arm, "level": level, "queries": int(r["n_queries"]), **{c: round(r[c], 2) for c in COLS}})
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False))
    print("\n| stage | seconds | steps | samples | samples/s |\n|---|---|---|---|---|")
    for k, v in timings.items():
        print(f"| {k} | {v['seconds']} | {v.get('steps', '')} | {v.get('samples', '')} | {v.get('samples_per_second', '')} |")
    print(f"\npeak RSS after training: {peak_train:.0f} MiB")
    os.makedirs(args.out, exist_ok=True)
    tag = "_".join([params["profile"], m["preset"], *[s.replace("=", "-") for s in args.set]])
    with open(os.path.join(args.out, f"embedding_{tag}.json"), "w") as f:
        json.dump({"table": rows, "timings": timings, "peak_rss_mib": peak_train, "overrides": args.set}, f, indent=2)


if __name__ == "__main__":
    main()
