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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

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
    def load(cls, root: str | Path) -> "Catalog":
        root = Path(root)
        if not (root / "items.parquet").is_file():
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

    def image_file(self, rel: str) -> Path:
        return self.root / rel

    @property
    def ok_images(self) -> pd.DataFrame:
        return self.images[self.images["status"] == STATUS_OK]


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
