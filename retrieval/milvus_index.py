"""Milvus as the ann_index backend (params ann_index.backend: milvus): one collection per index
version, served through an object that quacks like the faiss index where the rest of the code
touches one (`ntotal`, `d`, `search(q, k) -> (scores, row positions)`), so retrieval/index_store.py
keeps one interface (build_and_publish, publish, load_version, cleanup, IndexReader) and the
service and the A/B variants run unchanged on either backend.

  <collection_prefix>_<version>   one collection per version: int64 primary key `id` = the row
                                  position (ids.npy in the version directory maps it to the item
                                  id, as faiss labels do), FLOAT_VECTOR `vector` of dim, metric IP
                                  (= cosine: the vectors are L2-normalised), index_type from params
  <collection_prefix>             an alias, swapped to a version's collection when it is made
                                  current (right before CURRENT moves): what other Milvus clients
                                  query. Our own readers never search through it: a loaded version
                                  searches the collection its meta.json names, so its row positions
                                  always match its ids.npy, whatever a publish does meanwhile.
                                  Index directories that share a server and a prefix (the A/B
                                  variants' with one params.yaml) share the alias too: it follows
                                  the last version made current among them; give each its own
                                  prefix where something outside reads the alias.
The version directories (CURRENT, versions/<v>/{meta.json, ids.npy, milvus.json}) stay on disk as
for faiss: they are the contract with readers and the asset check. milvus.json (uri, collection) is
written before the collection is created, so what a killed publisher leaves (a temp directory) is
enough to drop its collection later.

Where Milvus runs: ann_index.milvus.uri, or the environment variable PAILITAO_MILVUS_URI, which
wins (at build and at load time).
  a path ending in .db            milvus-lite (embedded, tests / one machine): relative paths are
                                  taken from the index directory (data/processed/ann_index/milvus.db
                                  for the lineage's index; each A/B variant's index has its own)
  http(s)://host:19530[/db_name]  a Milvus server or cluster; credentials from PAILITAO_MILVUS_TOKEN
                                  ("user:password" or an API key), never from params or meta.json
One MilvusClient per uri per process (`client`). milvus-lite allows ONE process per .db file (it
holds an exclusive lock): a server serving from it and a `pailitao ann_index` run publishing into
it cannot run at the same time; use a Milvus server for that.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from retrieval.query import NotReady

log = logging.getLogger(__name__)

ENV_URI = "PAILITAO_MILVUS_URI"
ENV_TOKEN = "PAILITAO_MILVUS_TOKEN"
MAX_TOPK = 16384        # Milvus's limit on `limit` (and on queries per request)
QUERY_BATCH = 1024      # queries per search request
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,190}")


def check_cfg(cfg: dict) -> dict:
    """The milvus settings (merged with retrieval.index.DEFAULTS["milvus"] by resolve_cfg), checked."""
    if not _NAME.fullmatch(str(cfg["collection_prefix"])):
        raise ValueError(f"ann_index.milvus.collection_prefix must be letters, digits and underscores, starting "
                         f"with a letter or underscore; got {cfg['collection_prefix']!r}")
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", str(cfg["index_type"])):
        raise ValueError(f"ann_index.milvus.index_type must be a Milvus index type (FLAT, HNSW, IVF_FLAT, "
                         f"IVF_SQ8, AUTOINDEX, ...), got {cfg['index_type']!r}")
    if cfg["consistency_level"] not in ("Strong", "Bounded", "Session", "Eventually"):
        raise ValueError(f"ann_index.milvus.consistency_level must be Strong, Bounded, Session or Eventually, "
                         f"not {cfg['consistency_level']!r}")
    if int(cfg["insert_batch"]) < 1:
        raise ValueError(f"ann_index.milvus.insert_batch must be >= 1, got {cfg['insert_batch']}")
    return cfg


# ---------------------------------------------------------------- where Milvus runs
def is_local(uri: str) -> bool:
    """True for a milvus-lite database file, False for a server URI."""
    return "://" not in uri and not uri.startswith("unix:")


def configured_uri(uri: str) -> str:
    """The uri to use: PAILITAO_MILVUS_URI when set, else the given one (params or meta.json)."""
    return os.environ.get(ENV_URI) or str(uri)


def resolve_uri(uri: str, root) -> str:
    """uri with PAILITAO_MILVUS_URI applied and a relative milvus-lite path taken from root."""
    uri = configured_uri(uri)
    if not is_local(uri):
        return uri
    path = Path(uri).expanduser()
    if path.suffix != ".db":
        raise ValueError(f"a milvus-lite uri must be a path ending in .db (or use http://host:19530), got {uri!r}")
    return str((path if path.is_absolute() else Path(root) / path).resolve())


def redact(uri: str) -> str:
    """uri without user:password@ (what meta.json and logs may hold)."""
    if is_local(uri):
        return uri
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else uri


_clients: dict = {}
_clients_lock = threading.Lock()


def client(uri: str):
    """The process's MilvusClient for a resolved uri (see resolve_uri); OSError when unreachable."""
    from pymilvus import MilvusClient

    with _clients_lock:
        c = _clients.get(uri)
        if c is None:
            if is_local(uri):
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                c = MilvusClient(uri, token=os.environ.get(ENV_TOKEN, ""))
            except Exception as e:  # noqa: BLE001 - pymilvus raises its own types for every failure
                hint = (" (milvus-lite allows one process per .db file: is a server or another run using it?)"
                        if is_local(uri) else "")
                raise OSError(f"cannot open Milvus at {redact(uri)}: {e}{hint}") from None
            _clients[uri] = c
        return c


def collection_name(prefix: str, version: str) -> str:
    """The collection of one version: <prefix>_<version>, '-' as '_' (Milvus names allow [A-Za-z0-9_])."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', version)}"


def _milvus_error():
    from pymilvus.exceptions import MilvusException

    return MilvusException


# ---------------------------------------------------------------- the index object
class MilvusIndex:
    """One loaded collection, searched like a faiss index: ntotal, d, search(q, k) -> (D, I) with I
    the row positions (the int64 primary keys), -1 padded (D -inf) past what Milvus returns.
    Safe for concurrent callers (one gRPC channel per client). A failed search (Milvus unreachable,
    the collection dropped) raises retrieval.query.NotReady: the service answers 503."""

    def __init__(self, client, collection: str, ntotal: int, d: int, search_params: dict | None = None,
                 consistency_level: str = "Bounded", uri: str = ""):
        self.client, self.collection = client, collection
        self.ntotal, self.d = int(ntotal), int(d)
        self.search_params = dict(search_params or {})
        self.consistency_level = consistency_level
        self.uri = redact(uri)

    def __repr__(self) -> str:
        return f"MilvusIndex({self.uri} {self.collection}: {self.ntotal} x {self.d})"

    def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"queries must be [M, {self.d}], got shape {q.shape}")
        k = int(k)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        labels = np.full((len(q), k), -1, dtype=np.int64)
        limit = min(k, self.ntotal, MAX_TOPK)
        if limit < 1 or len(q) == 0:
            return scores, labels
        params = {"metric_type": "IP", "params": self.search_params}
        for s in range(0, len(q), QUERY_BATCH):
            try:
                res = self.client.search(self.collection, data=list(q[s:s + QUERY_BATCH]), limit=limit,
                                         output_fields=["id"], search_params=params,
                                         consistency_level=self.consistency_level)
            except _milvus_error() as e:
                raise NotReady(f"Milvus search in {self.collection} at {self.uri} failed: {e}") from None
            for i, hits in enumerate(res, start=s):
                n = len(hits)
                labels[i, :n] = [h["id"] for h in hits]
                scores[i, :n] = [h["distance"] for h in hits]
        return scores, labels


# ---------------------------------------------------------------- build, open, alias, drop
def build_collection(c, name: str, emb: np.ndarray, cfg: dict, uri: str = "") -> MilvusIndex:
    """Create collection `name` holding emb (row i under primary key i), index it, load it and
    check it holds every row. uri: the resolved one (a .db path selects milvus-lite's quirks).
    The caller drops the collection on failure (drop_collection)."""
    from pymilvus import DataType, MilvusClient

    n, dim = emb.shape
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
    c.create_collection(name, schema=schema, consistency_level=cfg["consistency_level"])
    batch = int(cfg["insert_batch"])
    for s in range(0, n, batch):
        rows = emb[s:s + batch]
        c.insert(name, [{"id": s + i, "vector": v} for i, v in enumerate(rows)])
    c.flush(name)
    # pymilvus 3 sends build params as flat key-value pairs (what a server reads); milvus-lite 3.2
    # reads only a JSON "params" pair and would silently build with its defaults (IVF nlist 128)
    build = dict(cfg["index_params"])
    build = {"params": build} if build and is_local(uri) else build
    index_params = c.prepare_index_params()
    index_params.add_index(field_name="vector", index_type=cfg["index_type"], metric_type="IP", params=build)
    c.create_index(name, index_params)
    c.load_collection(name)
    got = row_count(c, name)
    if got != n:
        raise RuntimeError(f"Milvus collection {name} holds {got} rows after loading, {n} were inserted")
    return MilvusIndex(c, name, n, dim, cfg["search_params"], cfg["consistency_level"], uri)


def row_count(c, name: str) -> int:
    res = c.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"])


def open_collection(uri: str, name: str, n: int, dim: int, search_params: dict | None = None,
                    consistency_level: str = "Bounded") -> MilvusIndex:
    """A published version's collection, loaded (milvus-lite forgets loads across restarts) and
    checked to hold n rows. FileNotFoundError when it is gone (dropped by a cleanup), ValueError
    when it holds another count, OSError when Milvus cannot be reached."""
    c = client(uri)
    try:
        if not c.has_collection(name):
            raise FileNotFoundError(f"Milvus collection {name} at {redact(uri)} does not exist (dropped?)")
        c.load_collection(name)
        got = row_count(c, name)
    except _milvus_error() as e:
        raise OSError(f"Milvus collection {name} at {redact(uri)} not loaded: {e}") from None
    if got != n:
        raise ValueError(f"Milvus collection {name} at {redact(uri)} holds {got} rows, meta.json says {n}")
    return MilvusIndex(c, name, n, dim, search_params, consistency_level, uri)


def alias_target(c, alias: str) -> str | None:
    """The collection `alias` points to, or None (no error logged for a missing alias)."""
    listed = c.list_aliases()
    names = listed.get("aliases", []) if isinstance(listed, dict) else list(listed)
    if alias not in names:
        return None
    return c.describe_alias(alias)["collection_name"]


def swap_alias(c, alias: str, collection: str) -> None:
    """Point alias at collection in one Milvus operation (alter_alias, or create_alias the first time)."""
    MilvusException = _milvus_error()
    if alias_target(c, alias) is None:
        try:
            c.create_alias(collection, alias)
            return
        except MilvusException:   # another publisher created it meanwhile
            pass
    c.alter_alias(collection, alias)


def drop_collection(uri: str, name: str, alias: str | None = None) -> bool:
    """Drop a version's collection (idempotent); never the one `alias` serves. True when it is gone."""
    try:
        c = client(uri)
        if alias and alias_target(c, alias) == name:
            log.warning("Milvus collection %s is what alias %s serves: not dropped", name, alias)
            return False
        if c.has_collection(name):
            c.drop_collection(name)
        return True
    except (OSError, _milvus_error()) as e:
        log.warning("Milvus collection %s at %s not dropped: %s", name, redact(uri), e)
        return False
