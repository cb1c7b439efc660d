"""The search pipeline shared by the API, the CLI and evaluation:

    query (image bytes and/or text) -> checked decode -> query embedding -> ANN top-N (faiss,
    hot-reloaded) -> merged with the lexical matches of the words (retrieval/lexical.py, when
    serving.hybrid.lexical_weight > 0) -> reranker hook -> top-k items with titles, categories,
    scores and the latency of every stage.

A `Searcher` serves one embedder over one index directory (retrieval/index_store.py versions). It never
loads anything on the request path: `refresh()` (called by a background thread in the server, or
once by the CLI) swaps in a new (index, item table) snapshot in one assignment, so searches already
running finish on the snapshot they started with.

Bad input raises a `QueryError` subclass carrying the HTTP status it maps to.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from core.config import Paths
from retrieval.index_store import IndexReader, Loaded
from retrieval.lexical import HybridConfig, LexicalIndex, hybrid_merge
from retrieval.models import ModelInfo, build_reranker, load_embedder, pair_with_index, published_meta
from retrieval.query import EmptyQuery, NotReady, QueryError, QueryLimits, TooLarge, UnknownItem, decode_query_image

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ items
class ItemTable:
    """Metadata of the indexed images (items.parquet of an item_embeddings directory): lookups
    by image id (the index's ids) and by item id, vectorised so a 1M-row table stays fast."""

    COLUMNS = ("image_id", "item_id", "title", "category", "category_display", "group_id", "image")

    def __init__(self, table: pd.DataFrame, root: Path | None = None):
        t = table.reset_index(drop=True)
        if "category_display" not in t.columns and "category" in t.columns:   # a table from before it
            t["category_display"] = t["category"]
        for col in self.COLUMNS:
            if col not in t.columns:
                t[col] = None
        self.root = root                          # image paths are relative to it
        self.cols = {c: t[c].to_numpy(dtype=object) for c in self.COLUMNS}
        self._by_image = pd.Index(t["image_id"].astype(str))
        item = np.asarray(t["item_id"].astype(str), dtype=str)
        self._order = np.argsort(item, kind="stable")
        self._sorted_items = item[self._order]
        self.n = len(t)
        self._table = t

    def documents(self) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, the text the lexical side indexes for each): item_embeddings writes title +
        keywords as `document`; an older table has the title only."""
        t = self._table
        first = ~t["item_id"].astype(str).duplicated()
        return (t.loc[first, "item_id"].astype(str).to_numpy(),
                t.loc[first, "document" if "document" in t else "title"].to_numpy(dtype=object))

    @classmethod
    def load(cls, emb_dir: str | Path) -> "ItemTable":
        emb_dir = Path(emb_dir)
        return cls(pd.read_parquet(emb_dir / "items.parquet"), emb_dir.parent)

    def positions(self, image_ids) -> np.ndarray:
        """Row of each image id; -1 where unknown."""
        return self._by_image.get_indexer(pd.Index(np.asarray(image_ids).astype(str)))

    def row(self, pos: int) -> dict:
        return {c: (None if pd.isna(v) else v) for c in self.COLUMNS for v in (self.cols[c][pos],)}

    def item(self, item_id: str) -> dict:
        """The item with its image ids; UnknownItem when absent."""
        lo = int(np.searchsorted(self._sorted_items, item_id, side="left"))
        hi = int(np.searchsorted(self._sorted_items, item_id, side="right"))
        if lo == hi:
            raise UnknownItem(f"unknown item {item_id!r}")
        rows = self._order[lo:hi]
        out = self.row(int(rows[0]))
        out.pop("image")
        out["image_ids"] = [str(self.cols["image_id"][r]) for r in rows]
        return out

    def image_path(self, key: str) -> Path | None:
        """The file of an image id (or of the first image of an item id); None if it has none."""
        pos = int(self.positions([key])[0])
        if pos < 0:
            pos = int(self.positions([self.item(key)["image_ids"][0]])[0])
        rel = self.cols["image"][pos]
        if self.root is None or rel is None or pd.isna(rel):
            return None
        return self.root / str(rel)


# ------------------------------------------------------------------------------------------ search
@dataclass
class Candidate:
    item_id: str
    image_id: str
    title: str | None
    category: str | None                  # the normalised category path judgments compare (data/taxonomy.py)
    group_id: str | None
    score: float                          # retrieval order: the cosine of query and item embedding, + lexical_weight x lexical in hybrid search
    lexical: float | None = None          # TF-IDF cosine of the query's words and the item's (hybrid search)
    rerank_score: float | None = None     # the reranker's ordering score (retrieval/rerank.py)
    p_instance: float | None = None       # calibrated P(same product instance) from the reranker
    image: str | None = None              # the catalog image file the reranker reads (not in responses)
    category_display: str | None = None   # the category as the catalog wrote it, for people


@dataclass
class Query:
    image: Image.Image | None
    text: str | None
    embedding: np.ndarray                 # [dim], L2-normalised


# A reranker gets the query and the ANN candidates (best first) and returns them in its order,
# with rerank_score / p_instance set (retrieval/rerank.py). serving.rerank: none -> the identity.
Reranker = Callable[[Query, list[Candidate]], list[Candidate]]


RERANK_PARTS = ("prepare", "model", "merge")   # latency_ms rerank_<part> when a reranker runs


def identity_rerank(query: Query, candidates: list[Candidate]) -> list[Candidate]:
    return candidates


@dataclass
class SearchResult:
    request_id: str
    results: list[Candidate]
    latency_ms: dict
    index_version: str
    model: str

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "index_version": self.index_version, "model": self.model,
                "latency_ms": self.latency_ms,
                "results": [{"rank": i + 1, **{k: v for k, v in asdict(c).items() if k != "image"}}
                            for i, c in enumerate(self.results)]}


@dataclass
class _Snapshot:
    loaded: Loaded
    items: ItemTable
    version: str
    lexical: LexicalIndex | None = None


class Searcher:
    """One embedder over one published index directory (+ the item_embeddings directory whose
    items.parquet names what the index holds)."""

    def __init__(self, embedder, model: ModelInfo, index_dir: str | Path, embeddings_dir: str | Path,
                 dim: int, limits: QueryLimits | None = None, reranker: Reranker | None = None,
                 candidates: int = 50, require_model_match: bool = True, use_gpu="auto",
                 hybrid: HybridConfig | None = None):
        self.embedder, self.model, self.dim = embedder, model, int(dim)
        self.index_dir, self.embeddings_dir = Path(index_dir), Path(embeddings_dir)
        self.limits = limits or QueryLimits()
        self.reranker = reranker or identity_rerank
        self.candidates = int(candidates)
        self.hybrid = hybrid or HybridConfig()
        self.require_model_match = require_model_match
        self.reader = IndexReader(self.index_dir, use_gpu=use_gpu)
        self._snap: _Snapshot | None = None
        self._items_key: tuple | None = None
        self._items: ItemTable | None = None
        self._refresh_lock = threading.Lock()
        self.last_error: str | None = None
        self.reloads = 0

    # ---------------------------------------------------------------- snapshots (off the request path)
    def _load_items(self) -> ItemTable:
        st = os.stat(self.embeddings_dir / "items.parquet")
        key = (st.st_ino, st.st_mtime_ns, st.st_size)   # the directory is replaced atomically
        if key != self._items_key:
            self._items, self._items_key = ItemTable.load(self.embeddings_dir), key
        return self._items

    def refresh(self) -> bool:
        """Load the current index version if it changed; True when a new snapshot went live. An
        index of the wrong dimension or (require_model_match) built by another model is refused:
        the previous snapshot keeps serving and last_error says why."""
        with self._refresh_lock:
            try:
                loaded = self.reader.get()
                snap = self._snap
                if snap is not None and snap.loaded is loaded:
                    return False
                meta = loaded.meta
                if int(meta["dim"]) != self.dim:
                    raise ValueError(f"index {meta['version']} has dim {meta['dim']}, the served dim is {self.dim}")
                built_by = meta.get("model_version") or ""
                if self.require_model_match and built_by != self.model.fingerprint:
                    raise ValueError(f"index {meta['version']} was built by model {built_by or '?'}, "
                                     f"this server embeds with {self.model.fingerprint} ({self.model.source}); "
                                     "rebuild item_embeddings and ann_index")
                items = self._load_items()
                missing = int((items.positions(loaded.ids[: min(len(loaded.ids), 1000)]) < 0).sum())
                if missing:
                    raise ValueError(f"index {meta['version']}: {missing} of its first ids are not in "
                                     f"{self.embeddings_dir / 'items.parquet'}")
                lexical = LexicalIndex(*items.documents()) if self.hybrid.enabled else None
                self._snap = _Snapshot(loaded, items, meta["version"], lexical)
                self.reloads += 1
                self.last_error = None
                log.info("serving index %s (%s, %d vectors) from %s", meta["version"], meta["kind"],
                         meta["n"], self.index_dir)
                return True
            except (OSError, ValueError, RuntimeError) as e:   # EIO, permissions: keep the old snapshot
                if str(e) != self.last_error:
                    log.warning("index %s not (re)loaded: %s", self.index_dir, e)
                self.last_error = str(e)
                return False

    @property
    def ready(self) -> bool:
        return self._snap is not None

    def snapshot(self) -> _Snapshot:
        snap = self._snap
        if snap is None:
            raise NotReady(f"no index loaded from {self.index_dir}: {self.last_error or 'not loaded yet'}")
        return snap

    def status(self) -> dict:
        snap = self._snap
        meta = snap.loaded.meta if snap else {}
        return {"ready": snap is not None, "index_dir": str(self.index_dir), "index_version": meta.get("version"),
                "kind": meta.get("kind"), "items": meta.get("n"), "recall": meta.get("recall"),
                "model": self.model.name, "model_source": self.model.source,
                "model_fingerprint": self.model.fingerprint, "error": self.last_error}

    # ---------------------------------------------------------------- lookups
    def item(self, item_id: str) -> dict:
        return self.snapshot().items.item(item_id)

    def image_path(self, key: str) -> Path | None:
        return self.snapshot().items.image_path(key)

    # ---------------------------------------------------------------- search
    def embed(self, image: Image.Image | None, text: str | None) -> np.ndarray:
        return self.embedder.encode([image], [text], batch_size=1, dim=self.dim)[0]

    def warm_up(self) -> None:
        """One throwaway query: the first forward pass allocates and is several times slower."""
        self.embed(Image.new("RGB", (64, 64), "white"), "warm up")

    def search(self, image: bytes | None = None, text: str | None = None, k: int = 10,
               request_id: str | None = None) -> SearchResult:
        """Top-k items for an image (bytes, untrusted) and/or a text."""
        t0 = time.perf_counter()
        text = " ".join(text.split()) if isinstance(text, str) else None
        if text and len(text) > self.limits.max_text_chars:
            raise TooLarge(f"text is {len(text)} characters; the limit is {self.limits.max_text_chars}")
        if not image and not text:
            raise EmptyQuery("send an image and/or a text")
        if not 1 <= int(k) <= 1000:
            raise QueryError(f"k must be in 1..1000, got {k}")
        snap = self.snapshot()   # the snapshot this request uses from start to end
        im = decode_query_image(image, self.limits) if image else None
        t1 = time.perf_counter()
        q = self.embed(im, text or None)
        t2 = time.perf_counter()
        weight = self.hybrid.weight_for(im is not None)
        hybrid = bool(text) and snap.lexical is not None and weight > 0
        # a reranker and the lexical merge see the top serving.candidates, whatever k the request asks
        want = max(int(k), self.candidates) if hybrid or self.reranker is not identity_rerank else int(k)
        # an item may have several catalog images: search deeper, keep each item's best image
        scores, ids = snap.loaded.search(q[None, :], min(snap.loaded.index.ntotal, 2 * want))
        pos = snap.items.positions(ids[0])
        cands, seen, cols = [], set(), snap.items.cols
        for s, p in zip(scores[0], pos):
            if p < 0 or not np.isfinite(s):
                continue
            item_id = str(cols["item_id"][p])
            if item_id in seen:
                continue
            seen.add(item_id)
            r = snap.items.row(int(p))
            path = snap.items.root / str(r["image"]) if snap.items.root is not None and r["image"] else None
            cands.append(Candidate(item_id, str(r["image_id"]), r["title"], r["category"], r["group_id"], float(s),
                                   image=str(path) if path else None, category_display=r["category_display"]))
            if len(cands) == want:
                break
        if hybrid:
            cands = self._merge_lexical(snap, text, cands, want, weight)
        t3 = time.perf_counter()
        ranked = self.reranker(Query(im, text or None, q), cands)[: int(k)]
        t4 = time.perf_counter()
        lat = {"decode": (t1 - t0) * 1e3, "embed": (t2 - t1) * 1e3, "ann": (t3 - t2) * 1e3,   # ann: + the lexical merge
               "rerank": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}
        stats = getattr(self.reranker, "last_stats", None) if cands else None
        if stats:   # the reranker's own parts: prompts and pixels, forward passes, merge
            lat.update({f"rerank_{part}": stats[f"{part}_ms"] for part in RERANK_PARTS if f"{part}_ms" in stats})
        return SearchResult(request_id or uuid.uuid4().hex, ranked, {k_: round(v, 3) for k_, v in lat.items()},
                            snap.version, self.model.name)

    def _merge_lexical(self, snap: _Snapshot, text: str, cands: list[Candidate], want: int,
                       weight: float) -> list[Candidate]:
        """The dense candidates merged with the words' lexical matches (retrieval/lexical.py)."""
        lex_ids, lex_s = snap.lexical.top([text], self.hybrid.candidates)
        order, fused = hybrid_merge([c.item_id for c in cands], [c.score for c in cands], lex_ids[0], lex_s[0],
                                    weight)
        lex = {i: float(s) for i, s in zip(lex_ids[0], lex_s[0]) if i is not None}
        by_id = {c.item_id: c for c in cands}
        out = []
        for item_id, score in zip(order[:want], fused):
            c = by_id.get(item_id)
            if c is None:   # a lexical-only match: its first catalog image
                r = snap.items.item(item_id)
                p = snap.items.image_path(r["image_ids"][0])
                c = Candidate(item_id, r["image_ids"][0], r["title"], r["category"], r["group_id"], score,
                              image=str(p) if p else None, category_display=r["category_display"])
            c.score, c.lexical = score, lex.get(item_id)
            out.append(c)
        return out


# ------------------------------------------------------------------------------------------ wiring
FROM_PARAMS = object()   # build_searcher's reranker: the one serving.rerank names


def build_searcher(params: dict, model: str | None = None, embeddings_dir: str | Path | None = None,
                   index_dir: str | Path | None = None, reranker: Reranker | None = FROM_PARAMS,
                   embedder=None, info: ModelInfo | None = None, dim: int | None = None) -> Searcher:
    """A Searcher from params (serving.*), loaded with the current index. Without `info`, the model
    and dim are those the index was built with (pair_with_index); with it, dim defaults to the
    published index's (else model.served_dim)."""
    s, paths = params["serving"], Paths.from_params(params)
    index_dir = index_dir or paths.asset("ann_index")   # the lineage's
    if info is None:
        info, dim = pair_with_index(params, model, index_dir)
    elif dim is None:
        try:
            dim = published_meta(index_dir)["dim"]
        except (FileNotFoundError, ValueError):
            dim = params["model"]["served_dim"]   # nothing published yet: refresh() picks it up later
    if reranker is FROM_PARAMS:
        reranker = build_reranker(params)
    searcher = Searcher(embedder or load_embedder(info), info, index_dir,
                        embeddings_dir or paths.asset("item_embeddings"), dim,
                        QueryLimits.from_params(params), reranker, s["candidates"],
                        s["require_model_match"], params["ann_index"].get("use_gpu", "auto"),
                        HybridConfig.from_params(params))
    searcher.refresh()
    searcher.warm_up()
    return searcher
