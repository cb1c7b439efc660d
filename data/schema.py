"""The normalized catalog every source is turned into, and how it is read back.

A catalog directory holds:
  items.parquet       ITEM_COLUMNS (+ any extra columns a manifest carried)
  images.parquet      IMAGE_COLUMNS; `path` is relative to the directory, null when quarantined
  quarantine.parquet  QUARANTINE_COLUMNS: one row per image that could not be used, with the reason
  item_quarantine.parquet  ITEM_QUARANTINE_COLUMNS: one row per source item row that could not be
                      used (missing title, bad category, duplicate item_id, unknown split), with
                      the reason; its images are left out of images.parquet
  queries.parquet     optional, a manifest's own queries (QUERY_COLUMNS)
  meta.json           source name, synthetic flag, fingerprint, counts

A sharded catalog (data/shards.py) holds one such directory per shard under shards/<name>/ and a
meta.json whose `shards` maps each shard in the catalog to its fingerprint; Catalog.load reads the
union (image paths gain the shards/<name>/ prefix, so they stay relative to the root).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.config import fingerprint
from core.io import read_json

ITEM_COLUMNS = {"item_id": "string", "title": "string", "category": "string",
                "group_id": "string", "split": "string"}
IMAGE_COLUMNS = {"image_id": "string", "item_id": "string", "view": "string",
                 "source_path": "string", "path": "string", "status": "string",
                 "reason": "string", "orig_width": "Int64", "orig_height": "Int64",
                 "width": "Int64", "height": "Int64", "sha256": "string",
                 "dhash": "string", "bytes": "Int64"}
QUARANTINE_COLUMNS = ["image_id", "item_id", "source_path", "reason"]
ITEM_QUARANTINE_COLUMNS = {"item_id": "string", "row": "Int64", "reason": "string",
                           "rule": "string", "title": "string", "category": "string",
                           "split": "string", "images": "Int64"}
QUERY_COLUMNS = ["query_id", "image", "text", "item_id"]
CATALOG_VIEW = "catalog"   # images with this view are what the index serves
SPLITS = ("train", "val", "test")
STATUS_OK, STATUS_QUARANTINED = "ok", "quarantined"
SHARDS_DIR = "shards"


class CatalogError(ValueError):
    """Bad catalog input; the message names the file and the column or row."""


@dataclass
class Catalog:
    root: Path
    items: pd.DataFrame
    images: pd.DataFrame
    quarantine: pd.DataFrame
    queries: pd.DataFrame | None
    meta: dict
    item_quarantine: pd.DataFrame | None = None   # ITEM_QUARANTINE_COLUMNS (None: none recorded)

    @classmethod
    def load(cls, root: str | Path, shards: list[str] | None = None) -> "Catalog":
        """The catalog at root; of a sharded one, the union of all its shards, or of `shards`."""
        root = Path(root)
        if not (root / "items.parquet").is_file():
            if (root / SHARDS_DIR).is_dir() and (root / "meta.json").is_file():
                return _load_union(root, shards)
            raise CatalogError(f"{root}: not a catalog directory (items.parquet missing)")
        queries = root / "queries.parquet"
        item_q = root / "item_quarantine.parquet"
        return cls(root=root,
                   items=pd.read_parquet(root / "items.parquet"),
                   images=pd.read_parquet(root / "images.parquet"),
                   quarantine=pd.read_parquet(root / "quarantine.parquet"),
                   queries=pd.read_parquet(queries) if queries.is_file() else None,
                   meta=read_json(root / "meta.json"),
                   item_quarantine=pd.read_parquet(item_q) if item_q.is_file() else None)

    @property
    def shards(self) -> list[str]:
        """The shards this catalog is the union of (empty: not sharded)."""
        return list(self.meta.get("shards") or {})

    def shard(self, name: str) -> "Catalog":
        return Catalog.load(self.root / SHARDS_DIR / name)

    def image_file(self, rel: str) -> Path:
        return self.root / rel

    @property
    def ok_images(self) -> pd.DataFrame:
        return self.images[self.images["status"] == STATUS_OK]


def _prefixed(df: pd.DataFrame | None, column: str, prefix: str) -> pd.DataFrame | None:
    if df is None:
        return None
    df = df.copy()
    df[column] = (prefix + df[column].astype("string")).where(df[column].notna())
    return df


def _concat(frames: list) -> pd.DataFrame | None:
    frames = [f for f in frames if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def _unique_items(parts: dict[str, Catalog]) -> None:
    owner: dict[str, str] = {}
    for name, part in parts.items():
        for item in part.items["item_id"]:
            if item in owner:
                raise CatalogError(f"item_id {item!r} is in shard {owner[item]!r} and in shard {name!r}: "
                                   "item ids must be unique across shards")
            owner[item] = name


def _load_union(root: Path, shards: list[str] | None = None) -> Catalog:
    """The union of the shards root/meta.json lists (or of `shards` among them), in that order. An
    item id in two shards is an error naming both (ids must be unique across the catalog)."""
    meta = read_json(root / "meta.json")
    missing = [s for s in shards or () if s not in meta["shards"]]
    if missing:
        raise CatalogError(f"{root} holds no shard {', '.join(missing)} (it holds {', '.join(meta['shards'])})")
    parts = {name: Catalog.load(root / SHARDS_DIR / name) for name in meta["shards"] if not shards or name in shards}
    meta = union_meta(parts, root=meta.get("root")) if shards else meta
    _unique_items(parts)
    prefix = {name: f"{SHARDS_DIR}/{name}/" for name in parts}
    return Catalog(root=root,
                   items=_concat([p.items.assign(shard=n) for n, p in parts.items()]),
                   images=_concat([_prefixed(p.images, "path", prefix[n]).assign(shard=n) for n, p in parts.items()]),
                   quarantine=_concat([p.quarantine for p in parts.values()]),
                   queries=_concat([_prefixed(p.queries, "image", prefix[n]) for n, p in parts.items()]),
                   meta=meta,
                   item_quarantine=_concat([p.item_quarantine for p in parts.values()]))


def shards_union_meta(directory: Path, names: list[str], **extra) -> dict:
    """union_meta of the shards under directory/shards/ (pailitao.stages.rebuild_shards' `union`)."""
    return union_meta({n: Catalog.load(Path(directory) / SHARDS_DIR / n) for n in names}, **extra)


def union_meta(parts: dict[str, Catalog], **extra) -> dict:
    """The meta.json of a sharded catalog: which shards (name -> fingerprint), one fingerprint over
    them, counts summed (instances counted over the union: one product may span shards), the first
    shard's source description. An item id in two shards is refused here, before anything is published."""
    _unique_items(parts)

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    first = next(iter(parts.values())).meta
    meta = {k: v for k, v in first.items() if (isinstance(v, (str, bool)) or v is None) and k != "shard_key"}
    for key in {k for p in parts.values() for k in p.meta} - {"shard_key"}:
        values = [p.meta.get(key) for p in parts.values()]
        if all(count(v) for v in values):
            meta[key] = sum(values)
        elif all(isinstance(v, dict) and all(count(x) for x in v.values()) for v in values):   # counts by reason
            meta[key] = {k: sum(v.get(k, 0) for v in values) for k in sorted({k for v in values for k in v})}
    shards = {name: p.meta["fingerprint"] for name, p in parts.items()}
    groups = pd.concat([p.items["group_id"] for p in parts.values()])
    return {**meta, "shards": shards, "fingerprint": fingerprint(sorted(shards.items())),
            "instances": int(groups.nunique()), **extra}


def reason_class(reason) -> str:
    """A quarantine reason's class: the stable prefix before any " (detail)"."""
    return str(reason).split(" (", 1)[0]


def coerce(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Give the known columns their dtypes (missing ones become null); extra columns are kept."""
    df = df.copy()
    for col, dtype in columns.items():
        if col not in df.columns:
            df[col] = pd.NA
        df[col] = df[col].astype(dtype)
    return df[list(columns) + [c for c in df.columns if c not in columns]]
