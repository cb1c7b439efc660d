"""The retrieval floors a trained embedder is reported beside (evaluation/floors.py): a cosine kNN
on tiny thumbnails, BM25 and TF-IDF on the words, on the test queries of a profile's query sets
against the whole catalog, per query group (noise level, text, image_text).

    .venv/bin/python benchmarks/bench_floors.py [--profile demo] [--thumb-size 16]

Runs the data stages if their outputs are missing (no model is trained). Prints markdown; a group a
floor cannot answer (a photo for the text floors' image-only rows, words for thumbnails) is n/a.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import pandas as pd

from data.schema import Catalog
from evaluation import floors
from pailitao.lineage import domain_stages
from core.config import Paths, load_params

COLS = ["I-HR@1", "I-HR@10", "C-HR@10", "R@1", "R@10", "mAP@R"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workdir", default=None, help="params workdir override (data/processed lives below it)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--thumb-size", type=int, default=floors.THUMB_SIZE)
    ap.add_argument("--out", default="benchmarks/results", help="where the JSON result goes")
    args = ap.parse_args()
    params = load_params(args.profile, {"workdir": args.workdir} if args.workdir else None)
    paths = Paths.from_params(params)
    for name, fn in domain_stages("data").items():
        if not (paths.asset(name) / "meta.json").is_file():
            fn(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    qroot = paths.asset("query_sets")
    queries = pd.read_parquet(qroot / "queries.parquet")
    if "modality" not in queries:
        print("note: these query_sets predate text queries; rerun the query_sets stage for text / image_text\n")
    queries = queries[queries["split"] == args.split].reset_index(drop=True)
    rows, seconds = [], {}
    for name in floors.FLOORS:
        t0 = time.perf_counter()
        options = {"size": args.thumb_size} if name == "thumbnail_knn" else {}
        rep = floors.floor_report(name, catalog, queries, qroot, **options)
        seconds[name] = round(time.perf_counter() - t0, 1)
        for group, r in rep.iterrows():
            rows.append({"floor": name, "group": group, "queries": int(r["n_queries"]),
                         **{c: None if pd.isna(r[c]) else round(float(r[c]), 2) for c in COLS}})
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; profile={params['profile']} "
          f"split={args.split} queries={len(queries)} gallery={len(floors.gallery(catalog))} images "
          f"thumbnail={args.thumb_size}x{args.thumb_size}\n")
    table = pd.DataFrame(rows)
    print(table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval="n/a"))
    print("\n" + " | ".join(f"{k}: {v} s" for k, v in seconds.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"floors_{params['profile']}_{args.split}.json"), "w") as f:
        json.dump({"table": rows, "seconds": seconds, "thumb_size": args.thumb_size}, f, indent=2)


if __name__ == "__main__":
    main()
