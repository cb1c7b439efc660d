"""The faiss index over L2-normalised item embeddings: its kinds (flat / HNSW / IVF-PQ, chosen by
catalog size), building it (on a GPU when there is one), searching it, and checking its recall
against exact search. What an index *is*, kept apart from how a built one reaches the disk and a
reader: versions, atomic publishing and hot reload live in retrieval/index_store.py.

Scores are inner products (= cosine, the vectors are L2-normalised) for every kind. Item ids are a
parallel array (ids.npy, int or str): faiss labels are row numbers 0..N-1, because catalog ids are
strings, which faiss cannot hold. `search` maps labels back to ids.

Config (params ann_index): a plain dict; missing keys take DEFAULTS (nested dicts merge key by key).
  backend        "faiss" | "milvus". milvus: the versions' vectors live in a Milvus collection
                 (retrieval/milvus_index.py); kind / hnsw / ivfpq / use_gpu then do not apply, the
                 recall check and versioning (index_store) work the same.
  milvus         uri ("milvus.db": milvus-lite under the index directory; http://host:19530 a
                 server; env PAILITAO_MILVUS_URI wins), collection_prefix, index_type (FLAT | HNSW |
                 IVF_FLAT | ...), index_params / search_params (Milvus's own, e.g. {M, efConstruction}
                 / {ef}), consistency_level, insert_batch.
  kind           "auto" | "flat" | "hnsw" | "ivfpq". auto: flat below `exact_below` vectors, hnsw
                 below `hnsw_below`, ivfpq from there on.
  exact_below    50_000   below this exact search costs < ~10 ms per query: no reason to approximate.
  hnsw_below     250_000  benchmarks/bench_ann.py (2 cores, 512-d): at 100k HNSW reaches the
                 higher recall (0.991 at ef 64) with no training; at 1M IVF-PQ+SQ8 wins on every
                 axis (recall 0.99 at 29x exact QPS vs HNSW 0.98 at 10x; build 3.7 vs 12 min;
                 565 vs 2213 MiB). The switch lies between; re-measure on real embeddings.
  hnsw           M (graph degree, 32), ef_construction (100), ef_search (128). METRIC_INNER_PRODUCT.
  ivfpq          nlist ("auto": power of two near 4*sqrt(N), at most N/39 so k-means has 39 points
                 per list), m ("auto": dim/8 sub-quantizers, i.e. 8 dims per byte; must divide dim),
                 nbits (8), nprobe (16), train_size ("auto": 40*nlist, at most N; a seeded sample),
                 refine ("sq8" | "flat" | "none": re-rank the k*k_factor PQ candidates with 8-bit
                 scalar-quantized / full vectors; PQ alone stays far below 0.95 recall@10),
                 k_factor (8).
  recall_k, recall_sample, min_recall   10, 1000, 0.95: the asset check (see `recall_at_k`).
  use_gpu        "auto" (a GPU when faiss has GPU support and sees one) | True (required) | False.
                 The GPU trains and fills IVF-PQ, runs the exact search of the recall check, and
                 serves flat / IVF-PQ in `index_store.IndexReader`; HNSW is CPU-only. Stored
                 indexes are CPU ones.
  keep_versions  3        complete versions kept on disk by index_store.build_and_publish (plus
                 always the current and the previous).
  seed           0
"""
from __future__ import annotations

import copy
import logging
import math
import threading

import faiss
import numpy as np

from core.gpu import faiss_gpu_available, gpu_resources

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivfpq")
DEFAULTS: dict = {
    "backend": "faiss",
    "kind": "auto",
    "exact_below": 50_000,
    "hnsw_below": 250_000,
    "hnsw": {"M": 32, "ef_construction": 100, "ef_search": 128},
    "ivfpq": {"nlist": "auto", "m": "auto", "nbits": 8, "nprobe": 16, "train_size": "auto",
              "refine": "sq8", "k_factor": 8},
    "recall_k": 10,
    "recall_sample": 1000,
    "min_recall": 0.95,
    "use_gpu": "auto",
    "keep_versions": 3,
    "seed": 0,
    "incremental": True,
    "milvus": {"uri": "milvus.db", "collection_prefix": "pailitao_items", "index_type": "FLAT",
               "index_params": {}, "search_params": {}, "consistency_level": "Bounded", "insert_batch": 5000},
}


def resolve_cfg(cfg: dict | None = None) -> dict:
    """DEFAULTS overlaid with cfg (one level of nesting, like the hnsw / ivfpq sub-dicts)."""
    out = copy.deepcopy(DEFAULTS)
    for key, val in (cfg or {}).items():
        if key not in out:
            raise ValueError(f"unknown ann_index setting {key!r}; known: {sorted(out)}")
        if isinstance(out[key], dict):
            unknown = set(val) - set(out[key])
            if unknown:
                raise ValueError(f"unknown ann_index.{key} settings {sorted(unknown)}; known: {sorted(out[key])}")
            out[key].update(val)
        else:
            out[key] = val
    if out["backend"] not in ("faiss", "milvus"):
        raise ValueError(f"ann_index backend must be faiss or milvus, not {out['backend']!r}")
    if out["kind"] not in ("auto", *KINDS):
        raise ValueError(f"ann_index kind must be auto, flat, hnsw or ivfpq, not {out['kind']!r}")
    return out


# ---------------------------------------------------------------- input checks
def check_vectors(x, name: str = "emb", dim: int | None = None, tol: float = 1e-3) -> np.ndarray:
    """x as C-contiguous float32 [N, D]; ValueError if empty, wrong dim, non-finite or not unit-norm."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, the index has {dim}")
    sq = np.einsum("ij,ij->i", x, x)  # one pass, no N x D temporary; NaN / inf propagate into it
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        raise ValueError(f"{name} has non-finite values (first in row {bad[0]}, {bad.size} rows)")
    off = np.flatnonzero(np.abs(sq - 1) > 2 * tol)
    if off.size:
        raise ValueError(f"{name} must be L2-normalised: row {off[0]} has norm {math.sqrt(sq[off[0]]):.4f} "
                         f"({off.size} rows off by more than {tol})")
    return x


def check_ids(ids, n: int) -> np.ndarray:
    """ids as a 1-D int64 or str array of n unique values (np.save-able without pickle)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"ids must be 1-D with one id per vector ({n}), got shape {ids.shape}")
    if ids.dtype.kind in "iu":
        ids = ids.astype(np.int64)
    elif ids.dtype.kind in "OUS":
        ids = ids.astype(str)
    else:
        raise ValueError(f"ids must be integers or strings, got dtype {ids.dtype}")
    if len(np.unique(ids)) != n:
        raise ValueError("ids are not unique")
    return ids


# ---------------------------------------------------------------- GPU
def want_gpu(use_gpu) -> bool:
    if use_gpu == "auto":
        return faiss_gpu_available()
    if not isinstance(use_gpu, bool):
        raise ValueError(f"use_gpu must be 'auto', True or False, not {use_gpu!r}")
    if use_gpu and not faiss_gpu_available():
        raise RuntimeError("use_gpu=True, but faiss has no GPU support or sees no GPU")
    return use_gpu


def to_gpu(index):
    """A GPU copy of a flat / IVF-PQ (optionally refined) CPU index; HNSW is returned unchanged."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        base = to_gpu(idx.base_index)
        if not is_gpu_index(base):
            return index
        out = faiss.IndexRefine(base, idx.refine_index)  # refine vectors stay on the CPU
        out.k_factor = idx.k_factor
        out.referenced_objects.append(index)  # it owns refine_index
        return out
    if isinstance(idx, faiss.IndexHNSW):
        return index
    co = faiss.GpuClonerOptions()
    co.useFloat16 = isinstance(idx, faiss.IndexIVFPQ)  # PQ lookup tables above 48 KiB of shared memory
    return faiss.index_cpu_to_gpu(gpu_resources(), 0, idx, co)


def is_gpu_index(index) -> bool:
    if not isinstance(index, faiss.Index):   # another backend's index (retrieval/milvus_index.py)
        return False
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        return is_gpu_index(idx.base_index)
    return "Gpu" in type(idx).__name__


# ---------------------------------------------------------------- choose and build
def choose_kind(n: int, dim: int, cfg: dict | None = None) -> str:
    """The index kind for n vectors of dimension dim (cfg kind, or by size when auto)."""
    cfg = resolve_cfg(cfg)
    if cfg["kind"] != "auto":
        return cfg["kind"]
    if n < cfg["exact_below"]:
        return "flat"
    return "hnsw" if n < cfg["hnsw_below"] else "ivfpq"


def ivfpq_params(n: int, dim: int, cfg: dict | None = None) -> dict:
    """The ivfpq settings with "auto" values resolved for n vectors of dimension dim."""
    p = dict(resolve_cfg(cfg)["ivfpq"])
    if p["nlist"] == "auto":
        p["nlist"] = max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))
    if p["m"] == "auto":
        p["m"] = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
    if p["train_size"] == "auto":
        p["train_size"] = 40 * p["nlist"]  # k-means wants >= 39 points per centroid
    p["train_size"] = min(n, max(int(p["train_size"]), p["nlist"], 2 ** p["nbits"]))
    if dim % p["m"]:
        raise ValueError(f"ivfpq m={p['m']} must divide the dimension {dim}")
    if n < max(p["nlist"], 2 ** p["nbits"]):
        raise ValueError(f"ivfpq needs at least max(nlist, 2**nbits) = {max(p['nlist'], 2 ** p['nbits'])} "
                         f"vectors to train, got {n}")
    if p["refine"] not in ("sq8", "flat", "none"):
        raise ValueError(f"ivfpq refine must be sq8, flat or none, not {p['refine']!r}")
    return p


def build_index(emb, ids=None, cfg: dict | None = None):
    """A CPU faiss index over emb ([N, D] float32, L2-normalised; row i = ids[i]), kind by choose_kind."""
    cfg = resolve_cfg(cfg)
    emb = check_vectors(emb)
    n, d = emb.shape
    if ids is not None:
        check_ids(ids, n)  # fail before a long build, not at publish
    kind = choose_kind(n, d, cfg)
    gpu = want_gpu(cfg["use_gpu"])
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(emb)
    elif kind == "hnsw":
        h = cfg["hnsw"]
        index = faiss.IndexHNSWFlat(d, int(h["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(h["ef_construction"])
        index.add(emb)
    else:
        index = _build_ivfpq(emb, ivfpq_params(n, d, cfg), cfg["seed"], gpu)
    set_search_params(index, **search_params(cfg, kind))
    return index


def _build_ivfpq(emb: np.ndarray, p: dict, seed: int, gpu: bool):
    n, d = emb.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, p["train_size"], replace=False))
    train = emb[rows]
    base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
    base.cp.seed = seed
    built = False
    if gpu:
        try:
            g = to_gpu(base)
            g.train(train)
            g.add(emb)
            base, built = faiss.index_gpu_to_cpu(g), True
        except RuntimeError as e:  # e.g. an m the GPU kernels do not support
            log.warning("IVF-PQ build on GPU failed (%s); building on CPU", e)
    if not built:
        base.train(train)
        base.add(emb)
    if p["refine"] == "none":
        return base
    if p["refine"] == "flat":
        ref = faiss.IndexFlatIP(d)
    else:
        ref = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        ref.train(train)
    ref.add(emb)
    return faiss.IndexRefine(base, ref)


def search_params(cfg: dict, kind: str) -> dict:
    """The query-time knobs of cfg for an index of this kind."""
    cfg = resolve_cfg(cfg)
    if kind == "hnsw":
        return {"ef_search": int(cfg["hnsw"]["ef_search"])}
    if kind == "ivfpq":
        return {"nprobe": int(cfg["ivfpq"]["nprobe"]), "k_factor": float(cfg["ivfpq"]["k_factor"])}
    return {}


def set_search_params(index, ef_search: int | None = None, nprobe: int | None = None,
                      k_factor: float | None = None) -> None:
    """Set the query-time knobs that apply to this index (others are ignored)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        if k_factor:
            idx.k_factor = k_factor
        idx = faiss.downcast_index(idx.base_index)
    if ef_search and isinstance(idx, faiss.IndexHNSW):
        idx.hnsw.efSearch = int(ef_search)
    if nprobe and hasattr(idx, "nprobe"):
        idx.nprobe = int(nprobe)


def get_search_params(index) -> dict:
    """The query-time knobs set on this index (what publish records in meta.json)."""
    idx, out = faiss.downcast_index(index), {}
    if isinstance(idx, faiss.IndexRefine):
        out["k_factor"] = float(idx.k_factor)
        idx = faiss.downcast_index(idx.base_index)
    if isinstance(idx, faiss.IndexHNSW):
        out["ef_search"] = int(idx.hnsw.efSearch)
    if hasattr(idx, "nprobe"):
        out["nprobe"] = int(idx.nprobe)
    return out


def index_kind(index) -> str:
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexRefine, faiss.IndexIVFPQ)):
        return "ivfpq"
    if isinstance(idx, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(idx, faiss.IndexFlat):
        return "flat"
    return type(idx).__name__


# ---------------------------------------------------------------- recall
def recall_at_k(index, emb, k: int = 10, sample: int = 1000, seed: int = 0, use_gpu="auto") -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over a seeded sample of the indexed items used as queries.
    index: anything with ntotal and search(q, k) -> (scores, row positions): a faiss index or a
    retrieval.milvus_index.MilvusIndex.

    Exact = brute-force inner product over all of emb. The query item itself is in both lists, so
    this slightly favours the index (1 of k is free); item queries are what a catalog has at build time.
    """
    emb = check_vectors(emb)
    if index.ntotal != len(emb):
        raise ValueError(f"index holds {index.ntotal} vectors, emb has {len(emb)}")
    k = min(k, len(emb))
    rows = np.sort(np.random.default_rng(seed).choice(len(emb), min(sample, len(emb)), replace=False))
    q = emb[rows]
    if want_gpu(use_gpu):
        _, exact = faiss.knn_gpu(gpu_resources(), q, emb, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        _, exact = faiss.knn(q, emb, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, got = index.search(q, k)
    return float(np.mean([len(np.intersect1d(a, b[b >= 0])) / k for a, b in zip(exact, got)]))


# ---------------------------------------------------------------- search
_gpu_search_lock = threading.Lock()  # GPU indexes are not safe for concurrent callers; CPU ones are


def search(index, ids: np.ndarray, q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(scores [M, k], item ids [M, k]) for queries q [M, D]; slots past ntotal: score -inf, id -1 / ""."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = check_vectors(q, "queries", dim=index.d)
    if is_gpu_index(index):
        with _gpu_search_lock:
            scores, labels = index.search(q, int(k))
    else:
        scores, labels = index.search(q, int(k))
    out = ids[np.maximum(labels, 0)]
    missing = labels < 0
    if missing.any():
        out[missing] = "" if ids.dtype.kind == "U" else -1
        scores[missing] = -np.inf
    return scores, out


# ---------------------------------------------------------------- synthetic data
def clustered_embeddings(n: int, dim: int, clusters: int = 20_000, seed: int = 0,
                         item_noise: float = 0.7, instance_noise: float = 1.0,
                         spectrum: float = 0.5, chunk: int = 65_536) -> np.ndarray:
    """Synthetic L2-normalised [n, dim] float32 embeddings shaped like a catalog's, for tests and benchmarks.

    Items scatter around `clusters` instance centres (each item picks one uniformly: ~n/clusters per
    instance), which scatter around clusters/40 category centres. Noise is Gaussian with a decaying
    spectrum (std of axis i ∝ (i+1)^-spectrum) in a random rotation: like learned embeddings, the
    variation lives mostly in a few directions, so neighbours are well defined. Two items of one
    instance have cosine ~1/(1+item_noise²) = 0.67, of one category ~0.3, unrelated ~0; the local
    intrinsic dimension (MLE, k=20) is ~12 at 100k x 512, like SIFT / Deep1B. (Uniform points on
    the sphere would make all neighbours about equally far and ANN recall meaningless.)
    """
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = (np.arange(1, dim + 1) ** -float(spectrum)).astype(np.float32)
    scale /= np.linalg.norm(scale)  # a noise vector has expected squared norm 1
    rot = (rot.T * scale[:, None]).astype(np.float32)  # g @ rot = (g * scale) rotated

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cats = unit(rng.standard_normal((max(1, clusters // 40), dim), dtype=np.float32))
    centres = unit(cats[rng.integers(len(cats), size=clusters)]
                   + instance_noise * rng.standard_normal((clusters, dim), dtype=np.float32) @ rot)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32) @ rot
        x = centres[rng.integers(clusters, size=m)] + item_noise * noise
        out[s:s + m] = unit(x)
    return out
