"""The `ann_index` stage: a faiss index over L2-normalised item embeddings, chosen by catalog size,
checked for recall against exact search, written as immutable versions and published atomically.

Scores are inner products (= cosine, the vectors are L2-normalised) for every kind. Item ids are a
parallel array (ids.npy, int or str): faiss labels are row numbers 0..N-1, because catalog ids are
strings, which faiss cannot hold. `search` maps labels back to ids.

Config: a plain dict; missing keys take DEFAULTS (nested dicts merge key by key).
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
                 serves flat / IVF-PQ in `IndexReader`; HNSW is CPU-only. Stored indexes are CPU ones.
  keep_versions  3        complete versions kept on disk (plus always the current and the previous).
  seed           0

On disk (root = the index directory):
  root/CURRENT                    the live version's name; replaced by os.replace, so readers see
                                  the old or the new name, never a partial one
  root/versions/<version>/        index.faiss, ids.npy, meta.json (written last; lists file sizes and
                                  sha256, checked at every load: a corrupt version is refused, never served)
  root/versions/.tmp-<version>-<pid>@<host>/   a version being written; renamed into place only when
                                  complete; removed by the next publish once its writer is gone
Versions are named by UTC creation time (sortable) plus a random suffix.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from core.io import owner_tag, process_gone

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivfpq")
DEFAULTS: dict = {
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
}
STALE_TMP_SECONDS = 3600  # a temp without its writer's pid@host, younger than this, may be in use
FILES = ("index.faiss", "ids.npy")


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
_gpu_res = None


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def want_gpu(use_gpu) -> bool:
    if use_gpu == "auto":
        return gpu_available()
    if not isinstance(use_gpu, bool):
        raise ValueError(f"use_gpu must be 'auto', True or False, not {use_gpu!r}")
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True, but faiss has no GPU support or sees no GPU")
    return use_gpu


def _res():
    global _gpu_res
    if _gpu_res is None:  # one resource object (streams, temp memory) for the process
        _gpu_res = faiss.StandardGpuResources()
    return _gpu_res


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
    return faiss.index_cpu_to_gpu(_res(), 0, idx, co)


def is_gpu_index(index) -> bool:
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
        _, exact = faiss.knn_gpu(_res(), q, emb, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        _, exact = faiss.knn(q, emb, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, got = index.search(q, k)
    return float(np.mean([len(np.intersect1d(a, b[b >= 0])) / k for a, b in zip(exact, got)]))


# ---------------------------------------------------------------- versions on disk
class Loaded(NamedTuple):
    """One published version: unpacks as (index, ids, meta)."""
    index: object
    ids: np.ndarray
    meta: dict

    def search(self, q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        return search(self.index, self.ids, q, k)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # works for files and directories on Linux
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_failed(e: BaseException, what: str) -> OSError:
    """A failed write (disk full, I/O error: faiss and torch raise RuntimeError for these) as one
    OSError naming what was being written and what stays as it was."""
    return OSError(f"{what}: {e}")


_OWNED_TMP = re.compile(r"\.(?:tmp|CURRENT\.tmp)-.+-(\d+)@(.+)")


def _remove_stale_temps(root: Path) -> None:
    """What killed publishers left (a half-written version can be as large as the index: a disk
    filled by them fails the next publish): removed once the writer named in the name is gone, or,
    with no writer in the name, after STALE_TMP_SECONDS."""
    vroot = root / "versions"
    for p in [*(vroot.glob(".tmp-*") if vroot.is_dir() else []), *root.glob(".CURRENT.*")]:
        m = _OWNED_TMP.fullmatch(p.name)
        try:
            stale = process_gone(m[2], int(m[1])) if m else time.time() - p.stat().st_mtime > STALE_TMP_SECONDS
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            log.warning("removed %s, left by a publisher that is gone", p)


def _new_version() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def current_version(root) -> str:
    """The live version's name; FileNotFoundError when nothing was published yet."""
    path = Path(root) / "CURRENT"
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"no published index under {root} ({path} missing)") from None
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{path} holds no valid version name: {name!r}")
    return name


def versions(root) -> list[str]:
    """Names of the complete (renamed-into-place) versions, oldest first."""
    vdir = Path(root) / "versions"
    return sorted(p.name for p in vdir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if vdir.is_dir() else []


def publish(root, index, ids, meta: dict | None = None, *, keep: int = 3, make_current: bool = True) -> Path:
    """Write a new version of (index, ids, meta) and, if make_current, point CURRENT at it.

    Files go to versions/.tmp-<v>-<pid>@<host>/ and are fsynced; the directory is renamed to
    versions/<v>/ only when complete, and CURRENT is swapped only after that, so no reader can see a
    partial version. meta gets kind, n, dim, version, created, faiss version, search_params (read
    from the index), per-file sizes and sha256, and bytes (on disk, index + ids).
    A failed write (a full disk) raises OSError; CURRENT and what it serves stay as they were.
    Returns the version directory.
    """
    root = Path(root)
    if is_gpu_index(index):
        raise ValueError("publish a CPU index (faiss.index_gpu_to_cpu): GPU indexes cannot be written")
    ids = check_ids(ids, index.ntotal)
    version = _new_version()
    vroot = root / "versions"
    vroot.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp, final = vroot / f".tmp-{version}-{owner_tag()}", vroot / version
    tmp.mkdir()
    try:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "ids.npy", ids, allow_pickle=False)
        files = {name: (tmp / name).stat().st_size for name in FILES}
        # hashed as read back, after the write: what load_version will find, if nothing changes it
        meta = {"search_params": get_search_params(index), **(meta or {}), "version": version,
                "kind": index_kind(index), "n": int(index.ntotal), "dim": int(index.d),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "faiss_version": faiss.__version__, "files": files, "bytes": sum(files.values()),
                "sha256": {name: sha256_file(tmp / name) for name in FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
        for name in (*FILES, "meta.json"):
            _fsync(tmp / name)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(vroot)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise _write_failed(e, f"index version {version} not published under {root}, CURRENT unchanged") from e
        raise
    if make_current:
        try:
            previous = current_version(root)
        except (FileNotFoundError, ValueError):
            previous = None
        _swap_pointer(root, version)
        cleanup(root, keep, protect={version, previous})
    return final


def _swap_pointer(root: Path, version: str) -> None:
    tmp = root / f".CURRENT.tmp-{secrets.token_hex(4)}-{owner_tag()}"
    try:
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "CURRENT")  # atomic on POSIX: readers see the old or the new name
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(e, f"{root / 'CURRENT'} not switched to {version}, it names the version it did") from e
    _fsync(root)


def set_current(root, version: str) -> None:
    """Point CURRENT at an existing version (a rollback), after loading it fully as a check."""
    root = Path(root)
    load_version(root, version)  # raises on a missing, partial or corrupt version
    _swap_pointer(root, version)


def cleanup(root, keep: int = 3, protect=()) -> list[str]:
    """Delete all but the newest `keep` versions, never the current one or any in protect.

    publish protects the version it replaced: a reader may have just read the old pointer. A reader
    slower than two publishes can still lose its version mid-load; load_current then re-reads the
    pointer and loads the new one. Temps of writers that are gone are removed too.
    """
    root = Path(root)
    try:
        protect = set(protect) | {current_version(root)}
    except FileNotFoundError:
        protect = set(protect)
    names = versions(root)
    doomed = [v for v in names[: max(0, len(names) - max(1, keep))] if v not in protect]
    for v in doomed:  # renamed out of versions/ first: a kill mid-delete leaves a temp, not half a version
        gone = root / "versions" / f".tmp-{v}-{owner_tag()}"
        try:
            os.rename(root / "versions" / v, gone)
        except FileNotFoundError:  # another cleanup got it
            continue
        shutil.rmtree(gone, ignore_errors=True)
    _remove_stale_temps(root)
    return doomed


def load_version(root, version: str) -> Loaded:
    """Load and cross-check one version; FileNotFoundError if absent, ValueError if partial / corrupt
    (a size or sha256 other than meta.json's: a bit flipped on disk loads fine in faiss and would
    be served). Versions published before sha256 was recorded are checked by size only."""
    vdir = Path(root) / "versions" / version
    if not vdir.is_dir():
        raise FileNotFoundError(f"index version {vdir} does not exist")
    mpath = vdir / "meta.json"
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"index version {vdir} is incomplete or was removed: no meta.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {mpath}: {e}") from None
    for name, size in meta.get("files", {}).items():
        actual = (vdir / name).stat().st_size  # FileNotFoundError if the version was removed meanwhile
        if actual != size:
            raise ValueError(f"{vdir / name} is {actual} bytes, meta.json says {size}: truncated or corrupt")
    for name, want in meta.get("sha256", {}).items():
        got = sha256_file(vdir / name)
        if got != want:
            raise ValueError(f"{vdir / name} is corrupt: sha256 {got[:16]}..., meta.json says {want[:16]}...")
    ipath = vdir / "index.faiss"
    try:
        index = faiss.read_index(str(ipath))
    except RuntimeError as e:
        if not ipath.exists():
            raise FileNotFoundError(f"{ipath} is missing") from None
        raise ValueError(f"corrupt faiss index {ipath}: {e}") from None
    try:
        ids = np.load(vdir / "ids.npy", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt {vdir / 'ids.npy'}: {e}") from None
    if not (index.ntotal == len(ids) == meta.get("n")) or index.d != meta.get("dim"):
        raise ValueError(f"{vdir}: index has {index.ntotal} x {index.d}, ids {len(ids)}, "
                         f"meta.json n={meta.get('n')} dim={meta.get('dim')}")
    set_search_params(index, **meta.get("search_params", {}))
    return Loaded(index, ids, meta)


def load_current(root, retries: int = 5) -> Loaded:
    """(index, ids, meta) of the live version. If the version is deleted while loading (the pointer
    moved on twice, see cleanup), the pointer is re-read and the newer version loaded."""
    for _ in range(retries):
        version = current_version(root)
        try:
            return load_version(root, version)
        except FileNotFoundError:
            if current_version(root) == version:
                raise
    return load_version(root, current_version(root))


def build_and_publish(root, emb, ids, cfg: dict | None = None, model_version: str = "") -> dict:
    """Build, measure recall@k on a sample, publish; returns the version's meta.

    The version becomes current only if recall >= min_recall (meta["recall_ok"]), so an index that
    fails the asset check is kept for inspection but never served.
    """
    cfg = resolve_cfg(cfg)
    ids = check_ids(ids, len(emb))
    t0 = time.perf_counter()
    index = build_index(emb, None, cfg)
    build_s = time.perf_counter() - t0
    kind = index_kind(index)
    rec = recall_at_k(index, emb, cfg["recall_k"], cfg["recall_sample"], cfg["seed"], cfg["use_gpu"])
    params = {"flat": {}, "hnsw": cfg["hnsw"]}[kind] if kind != "ivfpq" else ivfpq_params(len(emb), index.d, cfg)
    meta = {"model_version": model_version, "build_seconds": round(build_s, 3), "recall": rec,
            "recall_k": cfg["recall_k"], "recall_sample": min(cfg["recall_sample"], len(emb)),
            "min_recall": cfg["min_recall"], "recall_ok": rec >= cfg["min_recall"],
            "params": params}
    vdir = publish(root, index, ids, meta, keep=cfg["keep_versions"], make_current=meta["recall_ok"])
    if not meta["recall_ok"]:
        log.warning("ann_index %s: recall@%d %.3f < %.2f, not made current", vdir.name, cfg["recall_k"], rec,
                    cfg["min_recall"])
    return json.loads((vdir / "meta.json").read_text())


class IndexReader:
    """The live version of root, cached; get() stats CURRENT (one syscall) and reloads on change.

    The new version replaces the cached reference in one assignment: searches already running on
    the old object finish on it, and it is freed when the last of them drops it. The first get()
    after a publish pays the load; a server can call get() from a background thread to prefetch.
    use_gpu: serve flat / IVF-PQ from a GPU copy ("auto": when one is available).
    A version that fails to load (corrupt) raises; the caller keeps what it got before (the service's
    Searcher.refresh does). Its error is remembered until CURRENT changes: a reload poll does not
    re-read and re-hash a large corrupt index every few seconds.
    """

    def __init__(self, root, use_gpu="auto"):
        self.root = Path(root)
        self.use_gpu = use_gpu
        self._lock = threading.Lock()
        self._state: tuple[tuple, Loaded] | None = None
        self._failed: tuple[tuple, str] | None = None  # the message only: a traceback holds what was loaded

    def _stamp(self) -> tuple:
        try:
            st = os.stat(self.root / "CURRENT")
        except FileNotFoundError:
            raise FileNotFoundError(f"no published index under {self.root} (CURRENT missing)") from None
        return st.st_ino, st.st_mtime_ns, st.st_size  # os.replace gives the pointer a new inode

    def get(self) -> Loaded:
        stamp, state = self._stamp(), self._state
        if state is not None and state[0] == stamp:
            return state[1]
        with self._lock:  # one loader at a time; others wait, then reuse its result
            state = self._state
            if state is None or state[0] != stamp:
                if self._failed and self._failed[0] == stamp:
                    raise ValueError(self._failed[1])
                try:
                    loaded = load_current(self.root)
                except ValueError as e:
                    self._failed = (stamp, str(e))
                    raise
                if want_gpu(self.use_gpu):
                    loaded = loaded._replace(index=to_gpu(loaded.index))
                    set_search_params(loaded.index, **loaded.meta.get("search_params", {}))
                state = self._state = (stamp, loaded)  # stamp was taken first: a later swap reloads again
            return state[1]

    def search(self, q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        return self.get().search(q, k)


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
