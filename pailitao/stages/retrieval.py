"""Retrieval lineage nodes: item_embeddings -> ann_index, and the recall rule the blocking asset
check runs. Like every stage module: read params, call retrieval/ functions, write atomically, one
MLflow run each."""
from __future__ import annotations

import logging
import os
import time
from functools import cache, partial
from pathlib import Path

import numpy as np
import pandas as pd

from data.schema import SHARDS_DIR, Catalog
from data.taxonomy import display_names
from evaluation.retrieval import cached_gallery, item_documents
from core.config import Paths, fingerprint
from core.io import atomic_path, read_json, write_json
from pailitao.stages import StageResult, finish, rebuild_shards, shard_info
from core.tracking import start_run
from retrieval import index_store
from retrieval.models import load_embedder, resolve_model, variant_dirs

log = logging.getLogger(__name__)


def item_embeddings(params: dict, dagster_run_id: str | None = None, *, model: str | None = None,
                    out: Path | None = None, shards: list[str] | None = None) -> StageResult:
    """Embed every catalog image (with its title) by the served embedder at model.served_dim; a
    sharded catalog shard by shard (only the shards whose images or embedder changed), with the
    union of all shards at the top of the directory, where ann_index and the service read it."""
    paths, t0 = Paths.from_params(params), time.perf_counter()
    catalog = Catalog.load(paths.asset("validated_catalog"))
    info = resolve_model(params, model)
    out = Path(out or variant_dirs(params, info.name)[0])
    dim = params["model"]["served_dim"]
    engine = None
    if params["compute"]["engine"] == "ray":   # a Ray Data actor pool (retrieval/ray_embed.py): same vectors
        from retrieval.ray_embed import ray_engine
        engine = ray_engine(info.path, params["compute"]["ray"])
    embed = partial(_embed_into, params, info, cache(partial(load_embedder, info)), dim, engine, out)
    shard_metrics, shard_meta = {}, {}
    if catalog.shards:   # a shard is embedded again when its images or the embedder changed
        keys = {n: fingerprint([fp, info.fingerprint, dim]) for n, fp in catalog.meta["shards"].items()}
        names, built = rebuild_shards(out, catalog.shards, keys,
                                      lambda name, dst, prev: embed(catalog.shard(name), keys[name], dst),
                                      partial(_union_embeddings, catalog, info, dim))
        shard_metrics, shard_meta = shard_info(names, built, shards)
    else:
        with atomic_path(out) as tmp:
            embed(catalog, None, tmp)
    seconds = time.perf_counter() - t0
    meta, items = read_json(out / "meta.json"), pd.read_parquet(out / "items.parquet")
    embedded = sum(read_json(out / SHARDS_DIR / n / "meta.json")["n"] for n in built) if catalog.shards else len(items)
    res = StageResult("item_embeddings", out,
                      metrics={"items": int(items["item_id"].nunique()), "images": len(items), "dim": dim,
                               "seconds": round(seconds, 1), **shard_metrics,
                               "images_embedded": embedded, "images_per_second": round(embedded / max(seconds, 1e-9), 1)},
                      info={"model": info.name, "model_source": info.source,
                            "model_version": info.fingerprint, "fingerprint": meta["fingerprint"],
                            "engine": params["compute"]["engine"], **shard_meta},
                      markdown={"preview": items.head(10).to_markdown(index=False)})
    with start_run("item_embeddings", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        return finish(res, run)


def _embed_into(params: dict, info, embedder, dim: int, engine, out: Path, catalog: Catalog, key: str | None,
                tmp: Path) -> None:
    """embeddings.npy, items.parquet and meta.json of one (unsharded) catalog into tmp. Image paths
    are relative to the parent of `out` (ItemTable resolves them from there), so the directory
    survives a moved workdir."""
    paths = Paths.from_params(params)
    g, emb = cached_gallery(paths.gallery_cache, info.fingerprint, embedder, catalog, dim,
                            params["serving"]["embed_batch_size"], engine=engine)
    catalog_rel = Path(os.path.relpath(Path(catalog.root).resolve(), out.resolve().parent))
    docs = dict(zip(*item_documents(catalog)))   # what the lexical side of hybrid search indexes
    items = g[["image_id", "item_id", "title", "category", "group_id"]].assign(
        category_display=g["item_id"].map(display_names(catalog.items)),
        image=[str(catalog_rel / p) for p in g["path"]], document=[docs[i] for i in g["item_id"]])
    fp = catalog.meta["fingerprint"]
    tmp.mkdir(parents=True)
    np.save(tmp / "embeddings.npy", emb)
    items.to_parquet(tmp / "items.parquet", index=False)
    write_json({"model": info.name, "model_source": info.source, "model_version": info.fingerprint,
                "dim": dim, "n": len(g), "catalog_fingerprint": fp,
                "fingerprint": fingerprint([fp, info.fingerprint, dim]), **({"shard_key": key} if key else {})},
               tmp / "meta.json")


def _union_embeddings(catalog: Catalog, info, dim: int, tmp: Path, names: list[str]) -> dict:
    """The union of the shards' embeddings at the top of a sharded item_embeddings directory."""
    parts = [tmp / SHARDS_DIR / n for n in names]
    metas = [read_json(p / "meta.json") for p in parts]
    np.save(tmp / "embeddings.npy", np.concatenate([np.load(p / "embeddings.npy") for p in parts]))
    pd.concat([pd.read_parquet(p / "items.parquet") for p in parts], ignore_index=True) \
        .to_parquet(tmp / "items.parquet", index=False)
    fp = catalog.meta["fingerprint"]
    return {"model": info.name, "model_source": info.source, "model_version": info.fingerprint, "dim": dim,
            "n": sum(m["n"] for m in metas), "catalog_fingerprint": fp,
            "fingerprint": fingerprint([fp, info.fingerprint, dim]),
            "shards": {n: m["shard_key"] for n, m in zip(names, metas)}}


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
                            "build": meta.get("build", "rebuilt"),
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
