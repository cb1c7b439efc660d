"""Retrieval floors: what a trained embedder must beat, on the same queries and the same gallery.

thumbnail_knn  each image flattened onto white, padded square, shrunk to a tiny RGB thumbnail,
               mean-centred on the gallery and L2-normalised; cosine kNN with faiss (rank_items).
bm25, tfidf    the query's words against each item's title (+ keywords / description when the
               catalog has them): BM25 (bm25s), and TF-IDF over word 1-2-grams and char 3-5-grams
               (typo-tolerant), cosine.

Each floor returns what evaluation.retrieval.rank_items does ([Q, k] distinct item ids, best first,
None padding), and ranks only the queries it applies to (an image floor has nothing to say about a
text-only query): their rows stay None. floor_report scores the applicable queries as
evaluation.retrieval.evaluate scores a model and lists the other groups as not applicable (nan)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data.images import to_rgb_on_white
from data.schema import Catalog
from evaluation.metrics import retrieval_report
from evaluation.retrieval import (TOP_K, gallery, item_documents, item_lexical_index, query_groups,
                                  rank_items, ranked_levels)
from retrieval.lexical import top_matches

THUMB_SIZE = 16
QUERY_BLOCK = 256   # queries scored at once against the whole catalog (memory: block x items floats)


def _present(col: pd.Series) -> np.ndarray:
    return np.array([isinstance(x, str) and bool(x.strip()) for x in col], dtype=bool)


def applicable(name: str, queries: pd.DataFrame) -> np.ndarray:
    """[Q] bool: the queries a floor can answer (a photo for thumbnail_knn, words for the text floors)."""
    if name not in FLOORS:
        raise ValueError(f"unknown floor {name!r}; floors: {', '.join(FLOORS)}")
    return _present(queries["image" if name == "thumbnail_knn" else "text"])


# ------------------------------------------------------------------------------------------ image
def thumbnail(path: str | Path, size: int = THUMB_SIZE) -> np.ndarray:
    """[size * size * 3] float32 in [0, 1]: the image on white, padded square (shape kept), box-shrunk."""
    im = Image.open(path)
    im.draft("RGB", (size * 4, size * 4))   # JPEG: decode at a reduced scale, far faster
    im = to_rgb_on_white(im)
    side = max(im.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return np.asarray(square.resize((size, size), Image.Resampling.BOX), dtype=np.float32).ravel() / 255.0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def thumbnail_knn(catalog: Catalog, queries: pd.DataFrame, query_root: Path, k: int = TOP_K,
                  size: int = THUMB_SIZE) -> np.ndarray:
    g = gallery(catalog)
    g_vec = np.stack([thumbnail(catalog.image_file(p), size) for p in g["path"]])
    mean = g_vec.mean(axis=0)   # centring: white margins, shared by every clip-art, stop dominating cosine
    out = np.full((len(queries), k), None, dtype=object)
    sel = applicable("thumbnail_knn", queries)
    if sel.any():
        q_vec = np.stack([thumbnail(Path(query_root) / p, size) for p in queries["image"][sel]])
        out[sel] = rank_items(_unit(q_vec - mean), g, _unit(g_vec - mean), k)
    return out


# ------------------------------------------------------------------------------------------ text
def _rank_text(score_block, queries: pd.DataFrame, ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(queries), k), None, dtype=object)
    rows = np.flatnonzero(_present(queries["text"]))
    texts = queries["text"].to_numpy()
    for s in range(0, len(rows), QUERY_BLOCK):
        block = rows[s:s + QUERY_BLOCK]
        top, _ = top_matches(score_block([str(t) for t in texts[block]]), ids, k)   # ties: gallery order
        out[block, :top.shape[1]] = top
    return out


def bm25(catalog: Catalog, queries: pd.DataFrame, query_root: Path | None = None, k: int = TOP_K) -> np.ndarray:
    import bm25s
    from bm25s.tokenization import Tokenizer

    ids, docs = item_documents(catalog)
    tok = Tokenizer(stopwords="en")
    index = bm25s.BM25()
    index.index(tok.tokenize(docs, update_vocab=True, return_as="ids", show_progress=False), show_progress=False)

    def scores(texts: list[str]) -> np.ndarray:   # words the catalog never uses map to the empty token
        return np.stack([index.get_scores(t) for t in
                         tok.tokenize(texts, update_vocab=False, return_as="ids", show_progress=False)])
    return _rank_text(scores, queries, ids, k)


def tfidf(catalog: Catalog, queries: pd.DataFrame, query_root: Path | None = None, k: int = TOP_K) -> np.ndarray:
    index = item_lexical_index(catalog)   # the service's lexical side (retrieval/lexical.py)
    return _rank_text(index.scores, queries, index.ids, k)


FLOORS = {"thumbnail_knn": thumbnail_knn, "bm25": bm25, "tfidf": tfidf}


def floor_report(name: str, catalog: Catalog, queries: pd.DataFrame, query_root: Path, **options) -> pd.DataFrame:
    """retrieval_report of floor `name` per query group (+ 'all' = the queries it applies to), in the
    format of evaluation.retrieval.evaluate; a group it cannot answer is a row of nan, n_queries 0.
    options go to the floor (thumbnail_knn: size)."""
    q = queries[applicable(name, queries)].reset_index(drop=True)
    levels = (ranked_levels(FLOORS[name](catalog, q, query_root, **options), q, catalog) if len(q)
              else np.zeros((0, TOP_K), dtype=np.int8))
    rep = retrieval_report(levels, q["n_instance"].to_numpy(), q["n_concept"].to_numpy(), ks=(1, 5, 10),
                           groups=query_groups(q))
    rep = rep.reindex(pd.Index(["all", *sorted(set(query_groups(queries)))], name="group", dtype=object))
    return rep.assign(n_queries=rep["n_queries"].fillna(0).astype(int))
