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


def encode_gallery(embedder, catalog: Catalog, dim: int, batch_size: int = 64,
                   engine=None) -> tuple[pd.DataFrame, np.ndarray]:
    """The gallery and its [N, dim] (image, title) embeddings, streamed batch by batch with one
    progress bar, so memory holds one batch of decoded images, not the catalog. `engine` (optional,
    e.g. retrieval.ray_embed.ray_engine) embeds elsewhere instead: engine(rows, dim, batch_size) ->
    [N, dim], rows holding each gallery row's image file, title and position; embedder is unused."""
    from core.console import progress

    g = gallery(catalog)
    if engine is not None:
        rows = pd.DataFrame({"image": [str(catalog.image_file(p).absolute()) for p in g["path"]],
                             "title": g["title"].tolist(), "position": np.arange(len(g), dtype=np.int64)})
        return g, np.ascontiguousarray(engine(rows, dim, batch_size), dtype=np.float32)
    out = np.zeros((len(g), dim), dtype=np.float32)
    files, titles = g["path"].tolist(), g["title"].tolist()
    for s in progress(range(0, len(g), batch_size), "gallery", unit="batch"):
        ims = [Image.open(catalog.image_file(p)).convert("RGB") for p in files[s:s + batch_size]]
        out[s:s + len(ims)] = embedder.encode(ims, titles[s:s + batch_size], batch_size=batch_size, dim=dim)
    return g, out


def cached_gallery(cache_root: Path, model_fp: str, load_embedder, catalog: Catalog, dim: int,
                   batch_size: int = 64, engine=None) -> tuple[pd.DataFrame, np.ndarray]:
    """encode_gallery, cached under cache_root by (checkpoint fingerprint, dim, catalog fingerprint):
    the promotion gate, item_embeddings and reruns share one pass over the catalog; a retrained
    model or a new catalog version misses. load_embedder() is called only on a miss without an
    `engine` (encode_gallery's; it makes the same vectors, so the key is the same). The gallery
    gains `image`, the absolute image path."""
    from core.io import atomic_path

    cache = Path(cache_root) / f"gallery-{model_fp}-{dim}-{catalog.meta['fingerprint']}"
    if (cache / "emb.npy").is_file():
        return pd.read_parquet(cache / "gallery.parquet"), np.load(cache / "emb.npy")
    g, emb = encode_gallery(None if engine else load_embedder(), catalog, dim, batch_size, engine)
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


def rank_items(q_emb: np.ndarray, g: pd.DataFrame, g_emb: np.ndarray, k: int = TOP_K,
               with_scores: bool = False):
    """Top-k distinct item ids per query (an item with several catalog images counts once, at its
    best image); with_scores: also their [Q, k] cosines (nan padding)."""
    index = faiss.IndexFlatIP(g_emb.shape[1])
    index.add(np.ascontiguousarray(g_emb, dtype=np.float32))
    sims, nn = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(len(g), k * 2))
    ids = g["item_id"].to_numpy()
    out = np.full((len(q_emb), k), None, dtype=object)
    scores = np.full((len(q_emb), k), np.nan, dtype=np.float32)
    for qi, (row, sim) in enumerate(zip(nn, sims)):
        best = {}
        for j, s in zip(row, sim):
            if j >= 0 and ids[j] not in best:
                best[ids[j]] = s
        seen = list(best)[:k]
        out[qi, :len(seen)] = seen
        scores[qi, :len(seen)] = [best[i] for i in seen]
    return (out, scores) if with_scores else out


def rank_hybrid(q_emb: np.ndarray, queries: pd.DataFrame, g: pd.DataFrame, g_emb: np.ndarray, lexical, cfg,
                k: int = TOP_K) -> np.ndarray:
    """rank_items merged with the lexical candidates of each query's words (retrieval/lexical.py):
    what the service returns (its top cfg.dense dense items merged, the deeper dense ones after).
    Queries without words, or a weight of 0, keep the dense order."""
    from retrieval.lexical import hybrid_merge

    ranked, scores = rank_items(q_emb, g, g_emb, max(k, cfg.dense), with_scores=True)
    texts = [t if isinstance(t, str) and t.strip() else None for t in queries["text"]]
    weights = [cfg.weight_for(isinstance(p, str)) for p in queries["image"]]
    rows = [i for i, t in enumerate(texts) if t is not None and weights[i] > 0]
    out = ranked[:, :k].copy()
    if rows:
        lex_ids, lex_s = lexical.top([texts[i] for i in rows], cfg.candidates)
        for r, li, ls in zip(rows, lex_ids, lex_s):
            order, _ = hybrid_merge(ranked[r, :cfg.dense], scores[r, :cfg.dense], li, ls, weights[r])
            merged = set(order)
            order += [i for i in ranked[r, cfg.dense:] if i is not None and i not in merged]
            out[r] = (order + [None] * k)[:k]
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


def item_documents(catalog: Catalog) -> tuple[np.ndarray, list[str]]:
    """The gallery's distinct item ids (gallery order) and the text a lexical index holds for each:
    title + keywords / description where the catalog has them."""
    from data.queries import WORD_COLUMNS

    ids = gallery(catalog)["item_id"].drop_duplicates().to_numpy()
    items = catalog.items.set_index("item_id").loc[ids]
    cols = ["title"] + [c for c in WORD_COLUMNS if c in items.columns]
    docs = [" ".join(str(v) for v in row if isinstance(v, str)) for row in items[cols].itertuples(index=False)]
    return ids, docs


def item_lexical_index(catalog: Catalog):
    from retrieval.lexical import LexicalIndex

    return LexicalIndex(*item_documents(catalog))


def lineage_queries(params: dict, split: str = "test", per_level: int | None = None):
    """(catalog, query root, queries) of a lineage's query_sets: one split, at most per_level a group.
    Also points the tower feature cache at the lineage's (benchmarks re-embed its queries)."""
    from core.config import Paths
    from training.vlm import use_feature_cache

    paths = Paths.from_params(params)
    use_feature_cache(paths.feature_cache)
    root = paths.asset("query_sets")
    q = pd.read_parquet(root / "queries.parquet")
    q = q[q["split"] == split]
    if per_level:
        q = q.groupby("level", group_keys=False).head(per_level)
    return Catalog.load(paths.asset("validated_catalog")), root, q.reset_index(drop=True)
