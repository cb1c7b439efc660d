"""The search pipeline shared by the API, the CLI and evaluation:

    query (image bytes and/or text) -> checked decode -> query embedding -> ANN top-N (faiss,
    hot-reloaded) -> merged with the lexical matches of the words (retrieval/lexical.py, when
    serving.hybrid.lexical_weight > 0) -> reranker hook -> top-k items with titles, categories,
    scores and the latency of every stage.

A `Searcher` serves one embedder over one index directory (retrieval/index.py versions). It never
loads anything on the request path: `refresh()` (called by a background thread in the server, or
once by the CLI) swaps in a new (index, item table) snapshot in one assignment, so searches already
running finish on the snapshot they started with.

Bad input raises a `QueryError` subclass carrying the HTTP status it maps to.
"""
from __future__ import annotations

import hashlib
import io
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

from data import images as imgs
from pailitao.config import Paths, resolve
from retrieval.index import IndexReader, Loaded
from retrieval.lexical import HybridConfig, LexicalIndex, hybrid_merge

log = logging.getLogger(__name__)

LINEAGE_MODELS = ("embedding_model", "baseline_embedder", "stage1_embedder")
CHAMPION, PROMOTABLE = "champion", ("embedding_model", "baseline_embedder")


# ------------------------------------------------------------------------------------------ errors
class QueryError(ValueError):
    """Bad query input; `status` is the HTTP status it maps to, `code` a stable machine name."""

    status, code = 400, "bad_request"


class EmptyQuery(QueryError):
    status, code = 422, "empty_query"


class UnsupportedImage(QueryError):
    status, code = 415, "unsupported_image"


class CorruptImage(QueryError):
    status, code = 400, "corrupt_image"


class UnusableImage(QueryError):
    status, code = 400, "unusable_image"


class TooLarge(QueryError):
    status, code = 413, "too_large"


class UnknownItem(QueryError):
    status, code = 404, "unknown_item"


class NotReady(RuntimeError):
    """No index is loaded yet (nothing published, or only indexes built by another model)."""


class NothingToServe(FileNotFoundError):
    """No published index, or no checkpoint (here or in the registry) that built it: a service
    cannot start. A FileNotFoundError, so the CLI says it in one line with exit code 2."""


# ------------------------------------------------------------------------------------------ decode
@dataclass(frozen=True)
class QueryLimits:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    min_side: int = 12
    max_aspect: float = 20.0
    max_side: int = 384                 # normalized like the catalog: RGB on white, longest side
    formats: tuple = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    max_text_chars: int = 500

    @classmethod
    def from_params(cls, params: dict) -> "QueryLimits":
        cfg = dict(params["serving"]["limits"])
        cfg["max_side"] = cfg.get("max_side") or params["ingest"]["max_side"]
        cfg["formats"] = tuple(f.upper() for f in cfg.get("formats", cls.formats))
        return cls(**cfg)


# data/images.py reasons -> the error a client gets
_REASONS = {imgs.EMPTY: EmptyQuery, imgs.TOO_LARGE_FILE: TooLarge, imgs.NOT_IMAGE: UnsupportedImage,
            imgs.CORRUPT: CorruptImage, imgs.TOO_MANY_PIXELS: TooLarge, imgs.TOO_SMALL: UnusableImage,
            imgs.BAD_ASPECT: UnusableImage}


def sniff_format(data: bytes) -> str | None:
    """The format named by the header (no pixels decoded); None when Pillow knows none."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:  # noqa: BLE001 - unknown or broken header: open_checked names the reason
        return None


def decode_query_image(data: bytes, limits: QueryLimits) -> Image.Image:
    """Untrusted bytes -> RGB on white, longest side limits.max_side. Sizes and the format are
    checked from the header before any pixel is decoded (decompression bombs cost nothing)."""
    if len(data) > limits.max_bytes:
        raise TooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = sniff_format(data)
    if fmt is not None and fmt not in limits.formats:
        raise UnsupportedImage(f"unsupported image format {fmt}; accepted: {', '.join(limits.formats)}")
    cfg = {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "min_side": limits.min_side,
           "max_aspect": limits.max_aspect}
    try:
        im = imgs.open_checked(data, cfg)
    except imgs.BadImage as e:
        reason = str(e)
        cls = next((c for r, c in _REASONS.items() if reason.startswith(r)), CorruptImage)
        raise cls(f"image rejected: {reason}") from None
    try:
        return imgs.to_rgb_on_white(im, limits.max_side)
    except Exception as e:  # noqa: BLE001 - e.g. a palette image whose pixels fail to convert
        raise CorruptImage(f"image rejected: {imgs.CORRUPT} ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelInfo:
    name: str           # embedding_model, baseline_embedder, ... or the directory given
    source: str         # models:/<registered>@<alias> or the local directory
    path: str           # the checkpoint directory loaded
    fingerprint: str    # model_fingerprint(path): what an index records as its model_version


def model_fingerprint(path: str | Path) -> str:
    """A content hash of a checkpoint directory that survives copies (an MLflow download): config
    files in full, and of every weight file its size plus its first and last MiB (hashing a
    16 GB checkpoint in full would take a minute at every start)."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(2**20))
                fh.seek(max(0, size - 2**20))
                h.update(fh.read(2**20))
    return h.hexdigest()[:16]


def _download(params: dict, name: str, version: str) -> Path:
    """The checkpoint directory of models:/name/version, downloaded once into data/processed/.registry/."""
    import mlflow

    from pailitao.io import atomic_path
    from pailitao.tracking import tracking_uri

    dest = Paths.from_params(params).processed / ".registry" / f"{name}-v{version}"
    if not (dest / "artifacts" / "model").is_dir():
        mlflow.set_tracking_uri(tracking_uri(params))
        with atomic_path(dest) as tmp:
            tmp.mkdir(parents=True)
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
    return dest / "artifacts" / "model"


def _registry_dir(params: dict, model: str, alias: str | None) -> tuple[Path, str] | None:
    """(checkpoint dir, models:/ uri) of <registered name of model>@alias; None when there is no
    such registered model or alias."""
    from pailitao.registry import EMBEDDER_NAMES

    name = EMBEDDER_NAMES.get(model)
    if not alias or not name:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from pailitao.tracking import tracking_uri

    try:
        version = mlflow.MlflowClient(tracking_uri(params)).get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None   # no such registered model or alias: serve the lineage's checkpoint
    return _download(params, name, str(version)), f"models:/{name}@{alias} (version {version})"


def resolve_model(params: dict, model: str | None = None) -> ModelInfo:
    """The embedder to serve: `model` (default params serving.model) is `champion` (the registered
    embedder holding that alias, else serving.fallback_model), a lineage stage name or a local
    checkpoint directory. For a stage, the registered model's `serving.registry_alias`
    (champion) wins when it exists, else data/processed/<stage>/model. item_embeddings resolves
    through here, so the index is built by the model that embeds queries; a service serves an
    index through pair_with_index, as the champion may since have moved to another run's model."""
    model = model or params["serving"]["model"]
    if model == CHAMPION:   # whichever embedder the promotion gate made champion (evaluation/promotion.py)
        for stage in PROMOTABLE:
            found = _registry_dir(params, stage, params["serving"].get("registry_alias") or CHAMPION)
            if found:
                return ModelInfo(stage, found[1], str(found[0]), model_fingerprint(found[0]))
        model = params["serving"]["fallback_model"]   # nothing promoted yet
    if model in LINEAGE_MODELS:
        found = _registry_dir(params, model, params["serving"].get("registry_alias"))
        if found:
            path, source = found
        else:
            path = Paths.from_params(params).asset(model) / "model"
            source = str(path)
    else:
        path = resolve(params, model)
        source = str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {model!r}: checkpoint directory {path} not found "
                                f"(run `pailitao {model}` first)" if model in LINEAGE_MODELS else
                                f"model directory {path} not found")
    return ModelInfo(model, str(source), str(path), model_fingerprint(path))


def model_by_fingerprint(params: dict, fp: str) -> ModelInfo | None:
    """The checkpoint whose fingerprint is `fp` (what an index records as its model_version): a
    lineage stage's own, else the newest registered embedder version tagged with it; None if none."""
    paths = Paths.from_params(params)
    for stage in LINEAGE_MODELS:
        path = paths.asset(stage) / "model"
        if path.is_dir() and model_fingerprint(path) == fp:
            return ModelInfo(stage, str(path), str(path), fp)
    if not fp.isalnum():   # it goes into a registry filter; an index from before fingerprints has ""
        return None
    import mlflow

    from pailitao.registry import EMBEDDER_NAMES, FINGERPRINT_TAG
    from pailitao.tracking import tracking_uri

    stages = {name: stage for stage, name in EMBEDDER_NAMES.items()}
    tagged = [v for v in mlflow.MlflowClient(tracking_uri(params)).search_model_versions(
        f"tags.`{FINGERPRINT_TAG}` = '{fp}'") if v.name in stages]
    if not tagged:
        return None
    v = max(tagged, key=lambda v: int(v.version))
    path = _download(params, v.name, str(v.version))
    return ModelInfo(stages[v.name], f"models:/{v.name}/{v.version}", str(path), model_fingerprint(path))


def published_meta(index_dir: str | Path) -> dict:
    """meta.json of the index version CURRENT names; FileNotFoundError when nothing is published."""
    from pailitao.io import read_json
    from retrieval.index import current_version

    return read_json(Path(index_dir) / "versions" / current_version(index_dir) / "meta.json")


def pair_with_index(params: dict, model: str | None, index_dir: str | Path) -> tuple[ModelInfo, int]:
    """(embedder, dim) that serve the published index in index_dir: the index's dim, and the model
    `model` resolves to only when it built the index, else the checkpoint that did (a lineage
    stage's, or the registered version tagged with its fingerprint): the registry's champion may
    come from a run on another catalog or profile, and an index is only searchable by its own model.
    NothingToServe (one line, naming the command that fixes it) when there is no such pair."""
    paths, profile = Paths.from_params(params), params.get("profile") or "demo"
    lineage = Path(index_dir) == paths.asset("ann_index")
    try:
        meta = published_meta(index_dir)
    except (FileNotFoundError, ValueError) as e:
        make = (f"`pailitao run --profile {profile} --out {paths.workdir}`" if lineage else
                f"`pailitao ab build --profile {profile} --workdir {paths.workdir}`")
        raise NothingToServe(f"nothing to serve: {e}; make one with {make}") from None
    dim, built_by = int(meta["dim"]), meta.get("model_version") or ""
    try:
        info, why = resolve_model(params, model), ""
    except FileNotFoundError as e:
        info, why = None, str(e)   # no checkpoint of its own: the one that built the index may be found
    if info is not None and (info.fingerprint == built_by or not params["serving"]["require_model_match"]):
        return info, dim
    found = model_by_fingerprint(params, built_by)
    if found is None:
        opts = f"--profile {profile} --workdir {paths.workdir}"
        fix = (f"`pailitao item_embeddings {opts}` then `pailitao ann_index {opts}`" if lineage else
               f"`pailitao ab build --force {opts}`")
        raise NothingToServe(f"nothing to serve: the index in {index_dir} (version {meta['version']}) was built by "
                             f"model {built_by or '?'}, which no checkpoint here or in the registry is "
                             f"({why or f'{info.source} is {info.fingerprint}'}); rebuild it for the served "
                             f"model: {fix}")
    log.warning("%s did not build the index in %s; serving %s, which did", info.source if info else model,
                index_dir, found.source)
    return found, dim


def load_embedder(info: ModelInfo):
    from training.backbone import MLLMEmbedder

    return MLLMEmbedder.from_pretrained(info.path)


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
def variant_dirs(params: dict, model: str, variant: str | None = None) -> tuple[Path, Path]:
    """(item_embeddings dir, ann_index dir) serving `model`: the lineage's for serving.model (or the
    champion it resolves to), else data/processed/ab/<variant>/ (built by `pailitao ab build`)."""
    paths, served = Paths.from_params(params), params["serving"]["model"]
    if variant is None or model == served or (served == CHAMPION and model == resolve_model(params).name):
        return paths.asset("item_embeddings"), paths.asset("ann_index")
    return paths.processed / "ab" / variant / "item_embeddings", paths.processed / "ab" / variant / "ann_index"


def build_searcher(params: dict, model: str | None = None, embeddings_dir: str | Path | None = None,
                   index_dir: str | Path | None = None, reranker: Reranker | None = None,
                   embedder=None, info: ModelInfo | None = None, dim: int | None = None) -> Searcher:
    """A Searcher from params (serving.*), loaded with the current index. Without `info`, the model
    and dim are those the index was built with (pair_with_index); with it, dim defaults to the
    published index's (else model.served_dim)."""
    s = params["serving"]
    default_emb, default_index = variant_dirs(params, model or s["model"])   # the lineage's
    index_dir = index_dir or default_index
    if info is None:
        info, dim = pair_with_index(params, model, index_dir)
    elif dim is None:
        try:
            dim = published_meta(index_dir)["dim"]
        except (FileNotFoundError, ValueError):
            dim = params["model"]["served_dim"]   # nothing published yet: refresh() picks it up later
    if reranker is None:
        from retrieval.rerank_stages import build_reranker
        reranker = build_reranker(params)
    searcher = Searcher(embedder or load_embedder(info), info, index_dir, embeddings_dir or default_emb, dim,
                        QueryLimits.from_params(params), reranker, s["candidates"],
                        s["require_model_match"], params["ann_index"].get("use_gpu", "auto"),
                        HybridConfig.from_params(params))
    searcher.refresh()
    searcher.warm_up()
    return searcher
