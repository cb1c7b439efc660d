"""The `ann_index` stage's output on disk: a built index (retrieval/index.py) written as immutable
versions, published atomically, and read back by the service with hot reload. Apart from the index
itself because this is a different contract, the one with readers: no reader may ever see a partial
or corrupt version, a killed or disk-full writer must leave what is served as it was, and the
service must swap in a new version without a pause.

  build_and_publish   build, measure recall@k, publish; made current only if recall >= min_recall
  publish             write a version, then point CURRENT at it; set_current rolls back
  load_version / load_current   load one version, checked against its meta.json (sizes, sha256)
  cleanup             keep the newest keep_versions (never the current or the previous one)
  IndexReader         the live version, cached, reloaded when CURRENT changes

On disk (root = the index directory):
  root/CURRENT                    the live version's name; replaced by os.replace, so readers see
                                  the old or the new name, never a partial one
  root/versions/<version>/        index.faiss, ids.npy, meta.json (written last; lists file sizes and
                                  sha256, checked at every load: a corrupt version is refused, never served)
                                  backend milvus (retrieval/milvus_index.py): no index.faiss; the vectors
                                  are the Milvus collection that milvus.json and meta.json name (uri,
                                  collection), dropped when cleanup removes the version; the alias
                                  <collection_prefix> is swapped to it right before CURRENT moves.
                                  meta.json without "backend" is a faiss version.
  root/versions/.tmp-<version>-<pid>@<host>/   a version being written; renamed into place only when
                                  complete; removed by the next publish once its writer is gone
Versions are named by UTC creation time (sortable) plus a random suffix.
"""
from __future__ import annotations

import hashlib
import json
import logging
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
from retrieval.index import (build_index, check_ids, check_vectors, choose_kind, get_search_params, index_kind,
                             ivfpq_params, is_gpu_index, recall_at_k, resolve_cfg, search, set_search_params, to_gpu,
                             want_gpu)

log = logging.getLogger(__name__)

STALE_TMP_SECONDS = 3600  # a temp without its writer's pid@host, younger than this, may be in use
FILES = ("index.faiss", "ids.npy")
MILVUS_FILES = ("ids.npy", "milvus.json")   # milvus.json: {uri, collection, alias}, written before the collection


def _milvus():
    """retrieval.milvus_index, imported on first use: faiss-only runs never load pymilvus."""
    from retrieval import milvus_index

    return milvus_index


def _is_milvus(index) -> bool:
    return type(index).__name__ == "MilvusIndex" and type(index).__module__ == "retrieval.milvus_index"


def _drop_milvus(root: Path, vdir: Path) -> bool:
    """Drop the collection a (removed or abandoned) version directory names in milvus.json; True when
    it is gone or there is none, False when Milvus refused or was unreachable (keep the directory:
    a later publish retries)."""
    try:
        m = json.loads((vdir / "milvus.json").read_text())
    except FileNotFoundError:
        return True
    except (json.JSONDecodeError, OSError) as e:
        log.warning("%s unreadable (%s): its Milvus collection, if any, is left as it is", vdir / "milvus.json", e)
        return True
    mi = _milvus()
    try:
        uri = mi.resolve_uri(m["uri"], root)
    except ValueError as e:
        log.warning("%s: %s", vdir / "milvus.json", e)
        return True
    return mi.drop_collection(uri, m["collection"], m.get("alias"))


class Loaded(NamedTuple):
    """One published version: unpacks as (index, ids, meta)."""
    index: object
    ids: np.ndarray
    meta: dict

    def search(self, q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        return search(self.index, self.ids, q, k)


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
                if not _drop_milvus(root, p):   # its collection stays: so does the directory naming it
                    continue
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


def _reserve(root: Path, version: str, marker: dict | None = None) -> Path:
    """Create versions/.tmp-<version>-<pid>@<host>/ (with milvus.json = marker, fsynced, when given)."""
    vroot = root / "versions"
    vroot.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = vroot / f".tmp-{version}-{owner_tag()}"
    if not tmp.is_dir():
        tmp.mkdir()
    if marker is not None and not (tmp / "milvus.json").exists():
        try:
            (tmp / "milvus.json").write_text(json.dumps(marker))
            _fsync(tmp / "milvus.json")
            _fsync(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_failed(e, f"index version {version} not published under {root}, CURRENT unchanged") from e
    return tmp


def publish(root, index, ids, meta: dict | None = None, *, keep: int = 3, make_current: bool = True,
            version: str | None = None) -> Path:
    """Write a new version of (index, ids, meta) and, if make_current, point CURRENT at it.

    Files go to versions/.tmp-<v>-<pid>@<host>/ and are fsynced; the directory is renamed to
    versions/<v>/ only when complete, and CURRENT is swapped only after that, so no reader can see a
    partial version. meta gets kind, n, dim, version, created, faiss version, search_params (read
    from the index), per-file sizes and sha256, and bytes (on disk, index + ids).
    index: a faiss index (written as index.faiss) or a retrieval.milvus_index.MilvusIndex, whose
    collection stays in Milvus: the version records it (milvus.json, meta backend / uri / collection
    / alias), publish owns it from here (dropped if the publish fails, or when cleanup removes the
    version), and the alias <collection_prefix> (meta["alias"]) is swapped to it before CURRENT.
    version: the name to publish under (build_and_publish names the collection after it first).
    A failed write (a full disk) raises OSError; CURRENT and what it serves stay as they were.
    Returns the version directory.
    """
    root = Path(root)
    milvus = _is_milvus(index)
    if is_gpu_index(index):   # False for a Milvus collection
        raise ValueError("publish a CPU index (faiss.index_gpu_to_cpu): GPU indexes cannot be written")
    ids = check_ids(ids, index.ntotal)
    version = version or _new_version()
    vroot = root / "versions"
    marker = None
    if milvus:
        meta = dict(meta or {})
        marker = {"uri": meta.get("uri") or index.uri, "collection": index.collection, "alias": meta.get("alias")}
    try:
        tmp = _reserve(root, version, marker)
    except OSError:
        if milvus:
            _milvus().drop_collection(_milvus().resolve_uri(marker["uri"], root), index.collection)
        raise
    final = vroot / version
    names = MILVUS_FILES if milvus else FILES
    try:
        if milvus:
            extra = {"backend": "milvus", **marker, "kind": meta.get("kind", "milvus"),
                     "search_params": index.search_params,
                     "consistency_level": index.consistency_level, "pymilvus_version": _pymilvus_version()}
        else:
            faiss.write_index(index, str(tmp / "index.faiss"))
            extra = {"kind": index_kind(index), "faiss_version": faiss.__version__}
        np.save(tmp / "ids.npy", ids, allow_pickle=False)
        files = {name: (tmp / name).stat().st_size for name in names}
        # hashed as read back, after the write: what load_version will find, if nothing changes it
        meta = {"search_params": get_search_params(index) if not milvus else {}, **(meta or {}), **extra,
                "version": version, "n": int(index.ntotal), "dim": int(index.d),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": files, "bytes": sum(files.values()),
                "sha256": {name: sha256_file(tmp / name) for name in names}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
        for name in (*names, "meta.json"):
            _fsync(tmp / name)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(vroot)
    except BaseException as e:
        if milvus and _drop_milvus(root, tmp) is False:
            log.warning("%s kept: it names the Milvus collection %s, not dropped yet", tmp, index.collection)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise _write_failed(e, f"index version {version} not published under {root}, CURRENT unchanged") from e
        raise
    if make_current:
        try:
            previous = current_version(root)
        except (FileNotFoundError, ValueError):
            previous = None
        _make_current(root, version, meta)
        cleanup(root, keep, protect={version, previous})
    return final


def _pymilvus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pymilvus")
    except PackageNotFoundError:
        return ""


def _make_current(root: Path, version: str, meta: dict) -> None:
    """Point CURRENT at version; for a Milvus version swap its alias first (back again if CURRENT
    cannot be switched), so the alias and CURRENT name the same version but for that instant."""
    if meta.get("backend", "faiss") != "milvus" or not meta.get("alias"):
        _swap_pointer(root, version)
        return
    mi = _milvus()
    uri = mi.resolve_uri(meta["uri"], root)
    try:
        c = mi.client(uri)
        before = mi.alias_target(c, meta["alias"])
        mi.swap_alias(c, meta["alias"], meta["collection"])
    except Exception as e:  # noqa: BLE001 - pymilvus raises its own types
        raise OSError(f"Milvus alias {meta['alias']} at {mi.redact(uri)} not switched to {meta['collection']}: "
                      f"{e}; CURRENT names the version it did") from e
    try:
        _swap_pointer(root, version)
    except OSError:
        if before and before != meta["collection"]:
            try:
                mi.swap_alias(c, meta["alias"], before)
            except Exception as e:  # noqa: BLE001
                log.warning("Milvus alias %s left on %s (CURRENT not switched): %s", meta["alias"],
                            meta["collection"], e)
        raise


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
    loaded = load_version(root, version)  # raises on a missing, partial or corrupt version
    _make_current(root, version, loaded.meta)


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
        if _drop_milvus(root, gone):   # a Milvus version: its collection first; if refused, the temp names it
            shutil.rmtree(gone, ignore_errors=True)
    _remove_stale_temps(root)
    return doomed


def load_version(root, version: str) -> Loaded:
    """Load and cross-check one version; FileNotFoundError if absent, ValueError if partial / corrupt
    (a size or sha256 other than meta.json's: a bit flipped on disk loads fine in faiss and would
    be served). Versions published before sha256 was recorded are checked by size only.
    A milvus version (meta backend) loads as a MilvusIndex on its collection, loaded in Milvus and
    checked to hold n rows; FileNotFoundError if the collection is gone, OSError if Milvus is unreachable."""
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
    backend = meta.get("backend", "faiss")
    if backend == "milvus":   # FileNotFoundError if its collection was dropped, OSError if Milvus is unreachable
        mi = _milvus()
        try:
            uri = mi.resolve_uri(meta["uri"], root)
            index = mi.open_collection(uri, meta["collection"], meta["n"], meta["dim"], meta.get("search_params"),
                                       meta.get("consistency_level", "Bounded"))
        except KeyError as e:
            raise ValueError(f"{mpath}: a milvus version without {e}") from None
    elif backend == "faiss":
        ipath = vdir / "index.faiss"
        try:
            index = faiss.read_index(str(ipath))
        except RuntimeError as e:
            if not ipath.exists():
                raise FileNotFoundError(f"{ipath} is missing") from None
            raise ValueError(f"corrupt faiss index {ipath}: {e}") from None
    else:
        raise ValueError(f"{mpath}: unknown backend {backend!r} (faiss or milvus)")
    try:
        ids = np.load(vdir / "ids.npy", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt {vdir / 'ids.npy'}: {e}") from None
    if not (index.ntotal == len(ids) == meta.get("n")) or index.d != meta.get("dim"):
        raise ValueError(f"{vdir}: index has {index.ntotal} x {index.d}, ids {len(ids)}, "
                         f"meta.json n={meta.get('n')} dim={meta.get('dim')}")
    if backend == "faiss":
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
    if cfg["backend"] == "milvus":
        return _build_and_publish_milvus(Path(root), emb, ids, cfg, model_version)
    t0 = time.perf_counter()
    grown = _grown(Path(root), emb, ids, cfg, model_version) if cfg["incremental"] else None
    if grown is None:
        index, added = build_index(emb, None, cfg), None
    else:   # the index's rows are the current version's, then the new ones
        index, order, added = grown
        emb, ids = emb[order], ids[order]
    build_s = time.perf_counter() - t0
    kind = index_kind(index)
    rec = recall_at_k(index, emb, cfg["recall_k"], cfg["recall_sample"], cfg["seed"], cfg["use_gpu"])
    params = {"flat": {}, "hnsw": cfg["hnsw"]}[kind] if kind != "ivfpq" else ivfpq_params(len(emb), index.d, cfg)
    meta = {**_recall_meta(cfg, model_version, build_s, rec, len(emb)), "params": params,
            "build": "rebuilt" if added is None else f"added {added} rows to {len(emb) - added}"}
    vdir = publish(root, index, ids, meta, keep=cfg["keep_versions"], make_current=meta["recall_ok"])
    _warn_unless_current(vdir, meta)
    return json.loads((vdir / "meta.json").read_text())


def _grown(root: Path, emb: np.ndarray, ids: np.ndarray, cfg: dict, model_version: str):
    """(the current faiss version's index with only the new rows added, the row order it holds, how
    many were added), when that is the index a rebuild would make: the same model and dim, a flat or
    HNSW index (they keep the vectors, so every kept row is checked unchanged) of the kind a rebuild
    would choose, no row removed or changed, at least one new. None otherwise (then rebuild)."""
    try:   # the current version's meta.json first: a version that cannot grow is not read in full
        version = current_version(root)
        meta = json.loads((root / "versions" / version / "meta.json").read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None
    kind = meta.get("kind") if meta.get("backend", "faiss") == "faiss" else None
    if (kind not in ("flat", "hnsw") or meta.get("model_version") != model_version or meta.get("dim") != emb.shape[1]
            or choose_kind(len(emb), emb.shape[1], cfg) != kind or meta.get("n", len(ids)) >= len(ids)):
        return None
    try:
        cur = load_version(root, version)
    except (FileNotFoundError, ValueError, OSError):
        return None
    pos = {str(i): k for k, i in enumerate(ids)}
    old = [pos.get(str(i)) for i in cur.ids]
    if None in old:   # a row left the catalog
        return None
    old = np.asarray(old, dtype=np.int64)
    if not np.array_equal(cur.index.reconstruct_n(0, len(old)), emb[old]):   # a kept row changed
        return None
    new = np.setdiff1d(np.arange(len(ids)), old)
    cur.index.add(np.ascontiguousarray(emb[new]))
    return cur.index, np.concatenate([old, new]), len(new)


def _recall_meta(cfg: dict, model_version: str, build_s: float, rec: float, n: int) -> dict:
    """The part of a version's meta.json every backend writes: its model, build time and recall."""
    return {"model_version": model_version, "build_seconds": round(build_s, 3), "recall": rec,
            "recall_k": cfg["recall_k"], "recall_sample": min(cfg["recall_sample"], n),
            "min_recall": cfg["min_recall"], "recall_ok": rec >= cfg["min_recall"]}


def _warn_unless_current(vdir: Path, meta: dict) -> None:
    if not meta["recall_ok"]:
        log.warning("ann_index %s: recall@%d %.3f < %.2f, not made current", vdir.name, meta["recall_k"],
                    meta["recall"], meta["min_recall"])


def _build_and_publish_milvus(root: Path, emb, ids: np.ndarray, cfg: dict, model_version: str) -> dict:
    """build_and_publish for backend milvus: the collection <prefix>_<version> is created (after
    milvus.json names it in the version's temp directory), filled, indexed, loaded and recall-checked
    against exact search over emb, then published like a faiss index."""
    mi = _milvus()
    mcfg = mi.check_cfg(cfg["milvus"])
    emb = check_vectors(emb)
    version = _new_version()
    stored_uri = mi.redact(mi.configured_uri(mcfg["uri"]))   # as configured (relative to root): meta.json
    uri = mi.resolve_uri(mcfg["uri"], root)
    name, alias = mi.collection_name(mcfg["collection_prefix"], version), mcfg["collection_prefix"]
    tmp = _reserve(root, version, {"uri": stored_uri, "collection": name, "alias": alias})
    try:
        t0 = time.perf_counter()
        index = mi.build_collection(mi.client(uri), name, emb, mcfg, uri)
        build_s = time.perf_counter() - t0
        rec = recall_at_k(index, emb, cfg["recall_k"], cfg["recall_sample"], cfg["seed"], cfg["use_gpu"])
    except BaseException as e:
        if _drop_milvus(root, tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError, mi._milvus_error())):
            raise OSError(f"Milvus collection {name} at {mi.redact(uri)} not built: {e}; index version {version} "
                          f"not published under {root}, CURRENT unchanged") from e
        raise
    meta = {**_recall_meta(cfg, model_version, build_s, rec, len(emb)),
            "kind": f"milvus-{mcfg['index_type'].lower()}", "uri": stored_uri, "alias": alias,
            "index_type": mcfg["index_type"], "params": dict(mcfg["index_params"])}
    vdir = publish(root, index, ids, meta, keep=cfg["keep_versions"], make_current=meta["recall_ok"],
                   version=version)
    _warn_unless_current(vdir, meta)
    if not meta["recall_ok"]:
        try:   # kept for inspection, not served: free its memory in Milvus (load_version loads it again)
            index.client.release_collection(name)
        except Exception as e:  # noqa: BLE001
            log.warning("Milvus collection %s not released: %s", name, e)
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
                if loaded.meta.get("backend", "faiss") == "faiss" and want_gpu(self.use_gpu):
                    loaded = loaded._replace(index=to_gpu(loaded.index))
                    set_search_params(loaded.index, **loaded.meta.get("search_params", {}))
                state = self._state = (stamp, loaded)  # stamp was taken first: a later swap reloads again
            return state[1]

    def search(self, q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        return self.get().search(q, k)
