"""Catalog embedding throughput: the in-process path (evaluation.retrieval.encode_gallery) vs Ray
Data on a local Ray (compute.engine: ray, retrieval/ray_embed.py), same catalog, same checkpoint,
same run; and how far apart their vectors are.

    .venv/bin/python benchmarks/bench_ray_embed.py [--instances 500] [--model tiny|packaged]
        [--actors 2] [--batch-size 32] [--workdir DIR] [--json FILE]

The catalog is the synthetic source (one catalog image per instance: --instances gallery rows); the
model is a random-init tiny preset or the packaged base model (untrained projector: throughput is
what is measured). Timed: local = loading the checkpoint + encoding; ray = the whole engine call
(actor start, each actor loading the checkpoint, encoding, collecting), on a Ray already started
(its start-up is reported apart). Prints markdown, and the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.config import Paths, load_params
from evaluation.retrieval import encode_gallery, gallery


def checkpoint(params: dict, catalog, model: str, model_dir: Path) -> Path:
    """A random-init tiny embedder or the packaged base model (no training) for `catalog`, saved once."""
    from training.backbone import MLLMEmbedder

    if not model_dir.is_dir():
        torch.manual_seed(0)
        if model == "tiny":
            emb = MLLMEmbedder.from_params(params["model"], catalog.items["title"].tolist())
        else:
            from PIL import Image

            from training.pretrained import build_base_model

            g = gallery(catalog).head(64)
            mp = params["model"]
            emb = build_base_model(mp["base"], int(mp["max_text_tokens"]), mp["mrl_dims"],
                                   ([Image.open(catalog.image_file(p)).convert("RGB") for p in g["path"]],
                                    g["title"].tolist()), documents=catalog.items["title"].tolist())
        emb.save_pretrained(model_dir)
    return model_dir


def build(workdir: Path, instances: int, model: str):
    """(params, catalog, checkpoint dir): the synthetic catalog and the model, written once under workdir."""
    from data.ingest import build_catalog
    from data.schema import Catalog
    from data.sources import load_source

    profile = "tiny" if model == "tiny" else "demo"
    params = load_params(profile, {"workdir": str(workdir), "dataset": {
        "source": "synthetic", "synthetic": {"instances": instances, "views_per_instance": 2, "image_size": 160}}})
    paths = Paths.from_params(params)
    cat_dir = paths.asset("validated_catalog")
    catalog = Catalog.load(cat_dir) if (cat_dir / "meta.json").is_file() else \
        build_catalog(load_source(params, paths), cat_dir, params["ingest"], params["validation"])
    model_dir = checkpoint(params, catalog, model, workdir / f"model-{model}")
    return params, catalog, model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500, help="synthetic instances = gallery images")
    ap.add_argument("--model", choices=("tiny", "packaged"), default="tiny")
    ap.add_argument("--actors", type=int, default=2, help="Ray CPU actors (and the local Ray's CPUs)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch, both paths")
    ap.add_argument("--workdir", default=None, help="keep the catalog and model here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    import ray

    from core.console import setup
    from retrieval.ray_embed import ray_engine
    from training.backbone import MLLMEmbedder
    from training.vlm import use_feature_cache

    setup()
    use_feature_cache(None)   # no disk cache of tower features: both paths compute them
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ray_embed-"))
    params, catalog, model_dir = build(workdir, args.instances, args.model)
    dim = params["model"]["served_dim"]
    n = len(gallery(catalog))

    t0 = time.perf_counter()
    _, local = encode_gallery(MLLMEmbedder.from_pretrained(model_dir), catalog, dim, args.batch_size)
    local_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray.init(num_cpus=args.actors, include_dashboard=False, logging_level="WARNING")
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        _, on_ray = encode_gallery(None, catalog, dim, args.batch_size, engine=ray_engine(
            str(model_dir), {"actors": args.actors, "batch_size": args.batch_size}))
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()

    res = {"model": args.model, "images": n, "dim": dim, "batch_size": args.batch_size, "actors": args.actors,
           "local_seconds": round(local_s, 2), "local_images_per_second": round(n / local_s, 1),
           "ray_init_seconds": round(init_s, 2), "ray_seconds": round(ray_s, 2),
           "ray_images_per_second": round(n / ray_s, 1),
           "max_abs_diff": float(np.abs(on_ray - local).max()),
           "torch_threads_local": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    print(f"\n| path | images | seconds | images/s |\n|---|---:|---:|---:|\n"
          f"| local (in process, {res['torch_threads_local']} torch threads) | {n} | {res['local_seconds']} | "
          f"{res['local_images_per_second']} |\n"
          f"| Ray Data, {args.actors} CPU actors (+ {res['ray_init_seconds']} s ray.init) | {n} | "
          f"{res['ray_seconds']} | {res['ray_images_per_second']} |\n\nmax |ray - local| = {res['max_abs_diff']:.2e}")
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
