"""Offline retrieval evaluation of an embedder: the whole catalog is the gallery (exact inner-product
search), queries come from query_sets, levels from the catalog judgments, metrics per query group
(noise level, or the text / image_text sets of shopper words)."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from PIL import Image

from data.judgments import relevance
from data.queries import GIVEN, IMAGE
from data.schema import CATALOG_VIEW, Catalog
from evaluation.metrics import retrieval_report

TOP_K = 100


def gallery(catalog: Catalog) -> pd.DataFrame:
    """The served images (view catalog) with their item's title, group and category."""
    g = catalog.ok_images[catalog.ok_images["view"] == CATALOG_VIEW]
    return g.merge(catalog.items[["item_id", "title", "group_id", "category"]], on="item_id") \
        .sort_values("image_id").reset_index(drop=True)


def encode_gallery(embedder, catalog: Catalog, dim: int, batch_size: int = 64) -> tuple[pd.DataFrame, np.ndarray]:
    """The gallery and its [N, dim] (image, title) embeddings, streamed batch by batch with one
    progress bar, so memory holds one batch of decoded images, not the catalog."""
    from tqdm.auto import tqdm

    g = gallery(catalog)
    out = np.zeros((len(g), dim), dtype=np.float32)
    files, titles = g["path"].tolist(), g["title"].tolist()
    for s in tqdm(range(0, len(g), batch_size), desc="gallery", unit="batch"):
        ims = [Image.open(catalog.image_file(p)).convert("RGB") for p in files[s:s + batch_size]]
        out[s:s + len(ims)] = embedder.encode(ims, titles[s:s + batch_size], batch_size=batch_size, dim=dim)
    return g, out


def cached_gallery(cache_root: Path, model_fp: str, load_embedder, catalog: Catalog, dim: int,
                   batch_size: int = 64) -> tuple[pd.DataFrame, np.ndarray]:
    """encode_gallery, cached under cache_root by (checkpoint fingerprint, dim, catalog fingerprint):
    the promotion gate, item_embeddings and reruns share one pass over the catalog; a retrained
    model or a new catalog version misses. load_embedder() is called only on a miss. The gallery
    gains `image`, the absolute image path."""
    from pailitao.io import atomic_path

    cache = Path(cache_root) / f"gallery-{model_fp}-{dim}-{catalog.meta['fingerprint']}"
    if (cache / "emb.npy").is_file():
        return pd.read_parquet(cache / "gallery.parquet"), np.load(cache / "emb.npy")
    g, emb = encode_gallery(load_embedder(), catalog, dim, batch_size)
    g = g.assign(image=[str(catalog.image_file(p)) for p in g["path"]])
    with atomic_path(cache) as tmp:
        tmp.mkdir(parents=True)
        g.to_parquet(tmp / "gallery.parquet", index=False)
        np.save(tmp / "emb.npy", emb)
    return g, emb


def encode_queries(embedder, queries: pd.DataFrame, root: Path, dim: int, batch_size: int = 64) -> np.ndarray:
    images = [Image.open(root / p).convert("RGB") if isinstance(p, str) else None for p in queries["image"]]
    texts = [t if isinstance(t, str) else None for t in queries["text"]]
    return embedder.encode(images, texts, batch_size=batch_size, dim=dim, progress=True)


def rank_items(q_emb: np.ndarray, g: pd.DataFrame, g_emb: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Top-k distinct item ids per query (an item with several catalog images counts once)."""
    index = faiss.IndexFlatIP(g_emb.shape[1])
    index.add(np.ascontiguousarray(g_emb, dtype=np.float32))
    _, nn = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(len(g), k * 2))
    ids = g["item_id"].to_numpy()
    out = np.full((len(q_emb), k), None, dtype=object)
    for qi, row in enumerate(nn):
        seen = list(dict.fromkeys(ids[j] for j in row if j >= 0))[:k]
        out[qi, :len(seen)] = seen
    return out


def query_groups(queries: pd.DataFrame) -> pd.Series:
    """The label a query is reported under: its level (clean / mild / hard / text / image_text), and
    for a manifest's own queries (level given) what they carry, so photos and words are not averaged
    together: given, given-text, given-image_text."""
    level = queries["level"].astype(object).reset_index(drop=True)
    if "modality" not in queries:
        return level
    modality = queries["modality"].astype(object).reset_index(drop=True)
    split = (level == GIVEN) & (modality != IMAGE)
    return level.where(~split, level + "-" + modality)


def evaluate(embedder, catalog: Catalog, queries: pd.DataFrame, query_root: Path, dim: int,
             gallery_cache: tuple[pd.DataFrame, np.ndarray] | None = None) -> pd.DataFrame:
    """retrieval_report per query group (query_groups, + 'all') for these queries against the whole
    catalog (an empty frame when there are no queries)."""
    if queries.empty:
        return pd.DataFrame(index=pd.Index([], name="group"))
    g, g_emb = gallery_cache or encode_gallery(embedder, catalog, dim)
    ranked = rank_items(encode_queries(embedder, queries, query_root, dim), g, g_emb)
    return retrieval_report(ranked_levels(ranked, queries, catalog), queries["n_instance"].to_numpy(),
                            queries["n_concept"].to_numpy(), ks=(1, 5, 10), groups=query_groups(queries))


def ranked_levels(ranked: np.ndarray, queries: pd.DataFrame, catalog: Catalog) -> np.ndarray:
    """Relevance level [Q, K] of each ranked item id (None = padding -> irrelevant) for each query."""
    items = catalog.items.set_index("item_id")
    qt = items.loc[queries["item_id"]]
    flat = ranked.ravel()
    known = np.array([x is not None for x in flat])
    d_group = np.where(known, items["group_id"].reindex(flat).to_numpy(), "\0none")
    d_cat = np.where(known, items["category"].reindex(flat).to_numpy(), "\0none")
    k = ranked.shape[1]
    return np.stack([relevance([qg], [qc], d_group[i * k:(i + 1) * k], d_cat[i * k:(i + 1) * k])[0]
                     for i, (qg, qc) in enumerate(zip(qt["group_id"], qt["category"]))])
