"""Catalog sources: each turns its input into one `Source` (tables pointing at original image files).

- openclipart: the Debian openclipart-png tree, one item per PNG.
- manifest:    any directory in the data contract (items.csv, images.csv, optional queries.csv).
- synthetic:   procedurally generated products (data/synthetic.py), always labelled synthetic.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data.images import ABSOLUTE, OUTSIDE, URL
from data.schema import CATALOG_VIEW, CatalogError
from pailitao.config import Paths, fingerprint

OPENCLIPART_HINT = ("the openclipart catalog is missing at {root}: install it with "
                    "`sudo apt-get install -y openclipart-png` (Debian/Ubuntu), or choose another "
                    "dataset (`--dataset DIR` for a manifest directory, or `--dataset synthetic`)")


@dataclass
class Source:
    name: str
    root: Path
    items: pd.DataFrame            # item_id, title, category, group_id (may be null), split (may be null), extras
    images: pd.DataFrame           # item_id, source_path (absolute), view, refused (optional: reason, else null)
    queries: pd.DataFrame | None = None  # query_id, image (absolute path or null), text, item_id, refused (optional)
    synthetic: bool = False
    auto_group: bool = False       # join obvious twins into one instance after decoding (openclipart)
    meta: dict = field(default_factory=dict)


def clean_category(value: str) -> str:
    parts = [re.sub(r"\s+", " ", p.strip().lower()) for p in str(value).split("/")]
    return "/".join(parts)


def clean_title(stem: str) -> str:
    words = [w for w in re.split(r"[_\-\s]+", stem) if w]
    while len(words) > 1 and words[-1].isdigit():  # drop export counters: parrot_01 -> parrot
        words.pop()
    return " ".join(words).strip()


def load_openclipart(root: str | Path) -> Source:
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(OPENCLIPART_HINT.format(root=root))
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise CatalogError(OPENCLIPART_HINT.format(root=root) + " (no PNG files found)")
    rows, imgs, seen = [], [], set()
    for p in files:
        rel = p.relative_to(root)
        item_id = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(rel.with_suffix("")).replace("/", "--"))
        if item_id in seen:  # "a+.png" and "a-.png" sanitize alike: keep ids unique and stable
            item_id += "-" + hashlib.sha1(str(rel).encode()).hexdigest()[:6]
        seen.add(item_id)
        category = clean_category(str(rel.parent)) if str(rel.parent) != "." else "misc"
        rows.append({"item_id": item_id, "title": clean_title(p.stem) or category.rsplit("/", 1)[-1],
                     "category": category, "group_id": None, "split": None, "file_stem": p.stem})
        imgs.append({"item_id": item_id, "source_path": str(p), "view": CATALOG_VIEW})
    return Source("openclipart", root, pd.DataFrame(rows), pd.DataFrame(imgs), auto_group=True,
                  meta={"files": len(files)})


def _read_csv(path: Path, required: list[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CatalogError(f"{path}: {what} file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - an unreadable CSV is a user error, named
        raise CatalogError(f"{path}: cannot parse CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            raise CatalogError(f"{path}: missing column '{col}' (has: {', '.join(df.columns)})")
    return df.apply(lambda s: s.str.strip()).replace("", None)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def catalog_file(root: Path, value: str) -> tuple[str, str | None]:
    """(real path, None) for a manifest image path that names a file inside root (a resolved
    directory), else (value, the reason it is refused). Symlinks are followed with lstat/readlink
    only (os.path.realpath; Path.resolve would stat the target), so a file outside the catalog is
    never stat'ed or opened; whether the target is a regular file is checked at decode time."""
    if _URL.match(value):
        return value, f"{URL} ({value})"
    if os.path.isabs(value):
        return value, f"{ABSOLUTE} ({value})"
    real = Path(os.path.realpath(root / value))
    if not real.is_relative_to(root):
        return value, f"{OUTSIDE} ({value})"
    return str(real), None


def _catalog_files(root: Path, values: pd.Series) -> pd.DataFrame:
    """catalog_file over a column (nulls stay null) as columns path, refused."""
    rows = [catalog_file(root, v) if pd.notna(v) else (None, None) for v in values]
    return pd.DataFrame(rows, columns=["path", "refused"], index=values.index, dtype=object)


def load_manifest(root: str | Path) -> Source:
    root = Path(root).resolve()
    if not root.is_dir():
        raise CatalogError(f"{root}: manifest directory not found")
    items = _read_csv(root / "items.csv", ["item_id", "title", "category"], "items")
    for col in ("group_id", "split"):
        if col not in items.columns:
            items[col] = None
    items["category"] = items["category"].map(lambda c: clean_category(c) if c is not None else None)
    items["split"] = items["split"].map(lambda s: s.lower() if s is not None else None)
    images = _read_csv(root / "images.csv", ["item_id", "image"], "images")
    missing = images["image"].isna()
    if missing.any():
        raise CatalogError(f"{root / 'images.csv'}: empty 'image' value on row(s) "
                           f"{list(images.index[missing][:5] + 2)}")
    checked = _catalog_files(root, images["image"])
    images["source_path"], images["refused"] = checked["path"], checked["refused"]
    images["view"] = images["view"].fillna(CATALOG_VIEW) if "view" in images else CATALOG_VIEW
    images = images.drop(columns=["image"])
    queries = None
    if (root / "queries.csv").is_file():
        queries = _read_csv(root / "queries.csv", ["query_id", "item_id"], "queries")
        if "image" not in queries and "text" not in queries:
            raise CatalogError(f"{root / 'queries.csv'}: needs an 'image' or a 'text' column")
        for col in ("image", "text"):
            if col not in queries:
                queries[col] = None
        empty = queries["image"].isna() & queries["text"].isna()
        if empty.any():
            raise CatalogError(f"{root / 'queries.csv'}: query {queries['query_id'][empty].iloc[0]!r} "
                               "has neither image nor text")
        checked = _catalog_files(root, queries["image"])
        queries["image"], queries["refused"] = checked["path"], checked["refused"]
    return Source("manifest", root, items, images, queries, meta={"manifest": str(root)})


def load_synthetic(cfg: dict, seed: int, paths: Paths) -> Source:
    from data import synthetic

    out = paths.raw / f"synthetic-{fingerprint({**cfg, 'seed': seed})}"
    synthetic.generate(out, instances=cfg["instances"], views_per_instance=cfg["views_per_instance"],
                       image_size=cfg["image_size"], seed=seed)
    src = load_manifest(out)
    src.name, src.synthetic = synthetic.SYNTHETIC_TAG, True
    src.meta = {"generator": "data.synthetic", **cfg, "seed": seed}
    return src


def sample_items(src: Source, limit: int | None, seed: int) -> Source:
    """Keep a deterministic pseudo-random subset of `limit` items (with their images)."""
    if not limit or len(src.items) <= limit:
        return src
    key = src.items["item_id"].map(lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    keep = set(src.items.loc[key.sort_values().index[:limit], "item_id"])
    src.items = src.items[src.items["item_id"].isin(keep)].reset_index(drop=True)
    src.images = src.images[src.images["item_id"].isin(keep)].reset_index(drop=True)
    if src.queries is not None:
        src.queries = src.queries[src.queries["item_id"].isin(keep)].reset_index(drop=True)
    src.meta["limit"] = limit
    return src


def load_source(params: dict, paths: Paths) -> Source:
    ds = params["dataset"]
    kind = ds["source"]
    if kind == "openclipart":
        src = load_openclipart(ds["root"])
    elif kind == "manifest":
        src = load_manifest(ds["root"])
    elif kind == "synthetic":
        src = load_synthetic(ds["synthetic"], params["seed"], paths)
    else:
        raise CatalogError(f"unknown dataset source {kind!r}: use openclipart, manifest or synthetic")
    return sample_items(src, ds.get("limit"), params["seed"])


def source_fingerprint(params: dict) -> str:
    """A cheap content fingerprint of the catalog source, for the Dagster sensor that retrains on
    a new catalog version: every file's relative path, size and mtime under the source root
    (openclipart tree or manifest directory); synthetic catalogs are fingerprinted by their params.
    Nothing is decoded, so a 10k-file tree takes well under a second."""
    import os

    ds = params["dataset"]
    if ds["source"] == "synthetic":
        return fingerprint([ds["synthetic"], params["seed"]])
    root = Path(ds["root"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"catalog source {root} is not a directory")
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            h.update(f"{os.path.relpath(os.path.join(dirpath, f), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
