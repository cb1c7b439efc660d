"""A new catalog shard of 1% of the catalog: the incremental update (what the catalog_update job runs
for one partition: raw_catalog -> validated_catalog -> item_embeddings -> ann_index, the other
shards kept) against a full rebuild of the same catalog, wall time per stage, same machine, same
run, same checkpoint.

    .venv/bin/python benchmarks/bench_incremental.py [--items 3000] [--shards 10] [--model packaged|tiny]
        [--workdir DIR] [--json FILE]
    .venv/bin/python benchmarks/bench_incremental.py --index-rows 100000 [--dim 128]

--index-rows N measures the index step alone at a size where it costs something: N synthetic
catalog-like vectors published, then N + 1% (the current index grown by the new rows,
ann_index.incremental) against a rebuild of the same N + 1% rows (incremental off), same run;
recall@10 of each against exact search.

The catalog is openclipart (dataset.root of params.yaml): --items PNGs in a deterministic sample,
written as --shards manifest shards (s00, s01, ...), plus one new shard (s<N>) of items/100 other
PNGs. Untimed: the base shards are ingested, validated, embedded and indexed in the incremental
workdir. Timed: the full rebuild (a fresh workdir: every shard) and then the incremental update
(the new shard). Both end with the same index contents, which is checked. Prints markdown and JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.config import Paths, dataset_override, deep_merge, load_params  # noqa: E402

STAGES = ("raw_catalog", "validated_catalog", "item_embeddings", "ann_index")


def write_shards(src_root: Path, out: Path, items: int, shards: int, seed: int = 0) -> tuple[list[str], str]:
    """(base shard names, new shard name): openclipart PNGs as manifest shards under out."""
    from data.sources import clean_category, clean_title

    files = sorted(p for p in src_root.rglob("*.png") if p.is_file())
    files.sort(key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest())
    new_n = max(1, items // 100)
    if len(files) < items + new_n:
        raise SystemExit(f"{src_root} holds {len(files)} PNGs; --items {items} needs {items + new_n}")
    groups = {f"s{k:02d}": files[k:items:shards] for k in range(shards)}
    new = f"s{shards:02d}"
    groups[new] = files[items:items + new_n]
    for name, group in groups.items():
        d = out / name
        rows, images = [], []
        for p in group:
            rel = p.relative_to(src_root)
            iid = hashlib.sha1(str(rel).encode()).hexdigest()[:12]
            (d / "img").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, d / "img" / f"{iid}.png")
            rows.append({"item_id": iid, "title": clean_title(p.stem) or "clipart",
                         "category": clean_category(str(rel.parent)) if str(rel.parent) != "." else "misc",
                         "group_id": iid, "split": ""})
            images.append({"item_id": iid, "image": f"img/{iid}.png", "view": "catalog"})
        pd.DataFrame(rows).to_csv(d / "items.csv", index=False)
        pd.DataFrame(images).to_csv(d / "images.csv", index=False)
    return [n for n in groups if n != new], new


def run_stages(params: dict) -> dict:
    """Seconds per stage (the four catalog_update stages, every shard asked for), and the summaries."""
    from pailitao.lineage import stage_function

    out = {}
    for name in STAGES:
        t0 = time.perf_counter()
        res = stage_function(name)(params)
        out[name] = {"seconds": round(time.perf_counter() - t0, 2), **res.summary()}
    return out


def index_update(rows: int, dim: int, work: Path) -> dict:
    """Publish `rows` vectors, then rows + 1%: grown (incremental) vs rebuilt, seconds and recall."""
    from retrieval import index_store
    from retrieval.index import clustered_embeddings

    new = max(1, rows // 100)
    emb = clustered_embeddings(rows + new, dim, clusters=max(rows // 5, 10))
    ids = np.array([f"img{i}" for i in range(rows + new)])
    out = {"rows": rows, "new_rows": new, "dim": dim}
    for mode in ("rebuilt", "grown"):
        root = work / f"index-{mode}"
        shutil.rmtree(root, ignore_errors=True)
        cfg = {"incremental": mode == "grown", "keep_versions": 2}
        index_store.build_and_publish(root, emb[:rows], ids[:rows], cfg, model_version="m")
        t0 = time.perf_counter()
        meta = index_store.build_and_publish(root, emb, ids, cfg, model_version="m")
        out[mode] = {"seconds": round(time.perf_counter() - t0, 2), "kind": meta["kind"], "build": meta["build"],
                     "recall_at_10": meta["recall"]}
    print(f"\n{rows} rows + {new} new, dim {dim}, {out['grown']['kind']}:\n\n| update | seconds (build + recall "
          f"check + publish) | recall@10 |\n|---|---:|---:|\n" + "".join(
              f"| {m} ({out[m]['build']}) | {out[m]['seconds']} | {out[m]['recall_at_10']:.4f} |\n"
              for m in ("rebuilt", "grown")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=3000, help="items in the base shards (the new shard: 1%%)")
    ap.add_argument("--shards", type=int, default=10, help="base shards")
    ap.add_argument("--model", choices=("tiny", "packaged"), default="packaged")
    ap.add_argument("--workdir", default=None, help="where catalogs and work dirs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--index-rows", type=int, default=0, help="measure only the index step at this many rows")
    ap.add_argument("--dim", type=int, default=128, help="--index-rows: vector dimension")
    args = ap.parse_args()
    if args.index_rows:
        res = index_update(args.index_rows, args.dim, Path(args.workdir or tempfile.mkdtemp(prefix="bench_index-")))
        print(json.dumps(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return

    from bench_ray_embed import checkpoint

    from core.console import setup
    from data.schema import Catalog
    from training.vlm import use_feature_cache

    setup()
    use_feature_cache(None)   # no disk cache of tower features: both runs compute them
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_incremental-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    profile = "tiny" if args.model == "tiny" else "demo"
    src_root = Path(load_params(profile)["dataset"]["root"])
    catalog_root = work / "catalog"
    shutil.rmtree(catalog_root, ignore_errors=True)
    base, new = write_shards(src_root, catalog_root, args.items, args.shards)
    held = work / f"held-{new}"
    shutil.rmtree(held, ignore_errors=True)
    shutil.move(catalog_root / new, held)   # the base catalog first

    def params_for(workdir: Path, model: Path | None = None) -> dict:
        return load_params(profile, deep_merge(dataset_override(str(catalog_root)), {
            "workdir": str(workdir), **({"serving": {"model": str(model)}} if model else {})}))

    for d in ("inc", "full"):
        shutil.rmtree(work / d, ignore_errors=True)
    # untimed: the base shards in the incremental workdir, and the checkpoint both runs serve
    from pailitao.stages.data import raw_catalog, validated_catalog

    p = params_for(work / "inc")
    raw_catalog(p)
    validated_catalog(p)
    model = checkpoint(p, Catalog.load(Paths.from_params(p).asset("validated_catalog")), args.model,
                       work / f"model-{args.model}")
    inc = params_for(work / "inc", model)
    setup_run = run_stages(inc)
    shutil.move(held, catalog_root / new)   # the new shard arrives

    full = run_stages(params_for(work / "full", model))
    incremental = run_stages(inc)

    ids = {}
    for label, prm in (("full", params_for(work / "full", model)), ("incremental", inc)):
        emb_dir = Paths.from_params(prm).asset("item_embeddings")
        ids[label] = (pd.read_parquet(emb_dir / "items.parquet")["image_id"].tolist(), np.load(emb_dir / "embeddings.npy"))
    same_ids = ids["full"][0] == ids["incremental"][0]
    max_diff = float(np.abs(ids["full"][1] - ids["incremental"][1]).max()) if same_ids else float("nan")

    rows = [{"stage": s, "full_seconds": full[s]["seconds"], "incremental_seconds": incremental[s]["seconds"],
             "ratio": round(full[s]["seconds"] / max(incremental[s]["seconds"], 1e-9), 1)} for s in STAGES]
    tot_full, tot_inc = sum(r["full_seconds"] for r in rows), sum(r["incremental_seconds"] for r in rows)
    rows.append({"stage": "total", "full_seconds": round(tot_full, 2), "incremental_seconds": round(tot_inc, 2),
                 "ratio": round(tot_full / max(tot_inc, 1e-9), 1)})
    res = {"model": args.model, "profile": profile, "base_items": setup_run["raw_catalog"]["items"],
           "new_items": incremental["raw_catalog"]["items"] - setup_run["raw_catalog"]["items"],
           "base_shards": len(base), "new_shard": new, "indexed": incremental["ann_index"]["n"],
           "incremental_built": {s: incremental[s].get("shards_built") for s in STAGES[:3]},
           "same_rows": same_ids, "max_abs_diff": max_diff, "stages": rows, "cpus": os.cpu_count(),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    print(f"\n{res['base_items']} items in {len(base)} shards + a new shard {new} of {res['new_items']} items "
          f"({args.model} model); index after: {res['indexed']} images; same rows as the full rebuild: "
          f"{same_ids}, max |diff| {max_diff:.1e}\n")
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
