"""Retrieval lineage nodes: item_embeddings -> ann_index, and the recall rule the blocking asset
check runs. Like every stage module: read params, call retrieval/ functions, write atomically, one
MLflow run each."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data.schema import Catalog
from data.taxonomy import display_names
from evaluation.retrieval import cached_gallery, item_documents
from core.config import Paths, fingerprint
from core.io import atomic_path, read_json, write_json
from pailitao.stages import StageResult, finish
from core.tracking import start_run
from retrieval import index_store
from retrieval.models import load_embedder, resolve_model, variant_dirs

log = logging.getLogger(__name__)


def item_embeddings(params: dict, dagster_run_id: str | None = None, *, model: str | None = None,
                    out: Path | None = None) -> StageResult:
    """Embed every catalog image (with its title) by the served embedder at model.served_dim."""
    paths, t0 = Paths.from_params(params), time.perf_counter()
    catalog = Catalog.load(paths.asset("validated_catalog"))
    info = resolve_model(params, model)
    out = Path(out or variant_dirs(params, info.name)[0])
    dim = params["model"]["served_dim"]
    engine = None
    if params["compute"]["engine"] == "ray":   # a Ray Data actor pool (retrieval/ray_embed.py): same vectors
        from retrieval.ray_embed import ray_engine
        engine = ray_engine(info.path, params["compute"]["ray"])
    g, emb = cached_gallery(paths.gallery_cache, info.fingerprint, lambda: load_embedder(info), catalog, dim,
                            params["serving"]["embed_batch_size"], engine=engine)
    seconds = time.perf_counter() - t0
    # image paths relative to the parent of `out` (ItemTable resolves them from there), so the
    # directory survives a moved workdir
    catalog_rel = Path(os.path.relpath(Path(catalog.root).resolve(), out.resolve().parent))
    docs = dict(zip(*item_documents(catalog)))   # what the lexical side of hybrid search indexes
    items = g[["image_id", "item_id", "title", "category", "group_id"]].assign(
        category_display=g["item_id"].map(display_names(catalog.items)),
        image=[str(catalog_rel / p) for p in g["path"]], document=[docs[i] for i in g["item_id"]])
    fp = catalog.meta["fingerprint"]
    meta = {"model": info.name, "model_source": info.source, "model_version": info.fingerprint,
            "dim": dim, "n": len(g), "catalog_fingerprint": fp,
            "fingerprint": fingerprint([fp, info.fingerprint, dim])}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "embeddings.npy", emb)
        items.to_parquet(tmp / "items.parquet", index=False)
        write_json(meta, tmp / "meta.json")
    res = StageResult("item_embeddings", out,
                      metrics={"items": int(g["item_id"].nunique()), "images": len(g), "dim": dim,
                               "seconds": round(seconds, 1),
                               "images_per_second": round(len(g) / max(seconds, 1e-9), 1)},
                      info={"model": info.name, "model_source": info.source,
                            "model_version": info.fingerprint, "fingerprint": meta["fingerprint"],
                            "engine": params["compute"]["engine"]},
                      markdown={"preview": items.head(10).to_markdown(index=False)})
    with start_run("item_embeddings", params, fp, dagster_run_id) as run:
        return finish(res, run)


def ann_index(params: dict, dagster_run_id: str | None = None, *, embeddings: Path | None = None,
              out: Path | None = None) -> StageResult:
    """An ANN index over item_embeddings (faiss, or a Milvus collection with ann_index.backend: milvus),
    recall-checked, published as a new version (made
    current only when recall@k reaches ann_index.min_recall)."""
    paths = Paths.from_params(params)
    embeddings = Path(embeddings or paths.asset("item_embeddings"))
    out = Path(out or paths.asset("ann_index"))
    src = read_json(embeddings / "meta.json")
    emb = np.load(embeddings / "embeddings.npy")
    ids = pd.read_parquet(embeddings / "items.parquet", columns=["image_id"])["image_id"].astype(str).to_numpy()
    meta = index_store.build_and_publish(out, emb, ids, params["ann_index"],
                                         model_version=src["model_version"])
    meta = {**meta, "embeddings_fingerprint": src["fingerprint"], "model": src["model"]}
    write_json(meta, out / "meta.json")   # the last build, current or not: what the asset check reads
    res = StageResult("ann_index", out,
                      metrics={"n": meta["n"], "dim": meta["dim"], "recall": meta["recall"],
                               "build_seconds": meta["build_seconds"], "mib": round(meta["bytes"] / 2**20, 2)},
                      info={"version": meta["version"], "kind": meta["kind"], "recall_ok": meta["recall_ok"],
                            "model_version": meta["model_version"], "fingerprint": src["fingerprint"]},
                      markdown={"build": pd.DataFrame([{k: meta[k] for k in (
                          "version", "kind", "n", "dim", "recall", "min_recall", "recall_ok", "build_seconds")}])
                          .to_markdown(index=False)})
    with start_run("ann_index", params, src["catalog_fingerprint"], dagster_run_id) as run:
        return finish(res, run)


def check_ann_index(params: dict, root: Path | None = None) -> tuple[bool, str, dict]:
    """(passed, description, metadata) of the recall rule on the last ann_index build."""
    meta = read_json(Path(root or Paths.from_params(params).asset("ann_index")) / "meta.json")
    passed = meta["recall"] >= meta["min_recall"]
    desc = (f"recall@{meta['recall_k']} {meta['recall']:.4f} on {meta['recall_sample']} items "
            f"{'>=' if passed else '<'} {meta['min_recall']} ({meta['kind']}, version {meta['version']}"
            f"{'' if passed else ', kept but not made current'})")
    return passed, desc, {k: meta[k] for k in ("version", "kind", "n", "recall", "min_recall", "recall_k")}


def build_variant_indexes(params: dict, variants: list, force: bool = False) -> dict:
    """item_embeddings + ann_index (the lineage's stage functions) for every variant that has no
    index of its own yet: the variant serving serving.model uses the lineage's."""
    out = {}
    for v in variants:
        emb_dir, index_dir = variant_dirs(params, v.model, v.name)
        if (index_dir / "CURRENT").is_file() and not force:
            out[v.name] = {"path": str(index_dir), "built": False}
            continue
        item_embeddings(params, model=v.model, out=emb_dir)
        out[v.name] = {**ann_index(params, embeddings=emb_dir, out=index_dir).summary(), "built": True}
    return out
