"""Catalog sources: each turns its input into one `Source` (tables pointing at original image files).

- openclipart: the Debian openclipart-png tree, one item per PNG.
- manifest:    any directory in the data contract (items.csv, images.csv, optional queries.csv).
- synthetic:   procedurally generated products (data/synthetic.py), always labelled synthetic.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data.images import ABSOLUTE, OUTSIDE, URL
from data.schema import CATALOG_VIEW, CatalogError
from data.taxonomy import DEFAULT_SEPARATOR, category_key, separator
from core.config import Paths, fingerprint

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
    # items: `category` holds the normalised key (data/taxonomy.py), `category_display` the text as given
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


TEXT_COLUMNS = ("item_id", "title", "category", "group_id", "split", "image", "view", "query_id", "text")
ROW = "__row__"   # the source row of an item (quarantine reports name it); dropped at ingest


def table_file(root: Path, stem: str, what: str, required: bool = True) -> Path | None:
    """root/stem.csv or root/stem.parquet (one of them); None when optional and absent."""
    found = [p for p in (root / f"{stem}.csv", root / f"{stem}.parquet") if p.is_file()]
    if len(found) > 1:
        raise CatalogError(f"{root}: both {stem}.csv and {stem}.parquet exist; keep one")
    if found:
        return found[0]
    if required:
        raise CatalogError(f"{root / (stem + '.csv')}: {what} file not found (nor {stem}.parquet)")
    return None


def _utf8_error(path: Path, raw: bytes, err: UnicodeDecodeError) -> str:
    """Where a non-UTF-8 byte sits: row (as a spreadsheet numbers them, the header is row 1),
    physical line and column, from the records parsed before it."""
    prefix = raw[:err.start].decode("utf-8", errors="replace").removeprefix("\ufeff")
    line = prefix.count("\n") + 1
    try:
        records = [r for r in csv.reader(io.StringIO(prefix + "\ue000")) if r]
    except csv.Error:
        records = []
    where = f"line {line}"
    if records:
        row, fields = len(records), len(records[-1])
        header = records[0] if row > 1 else None
        col = (f", column {header[fields - 1]!r}" if header and fields <= len(header)
               else f", field {fields}")
        where = f"row {row} (line {line}{col})" if row > 1 else f"the header (line {line})"
    hint = (" (the file looks like UTF-16: save it as UTF-8)"
            if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "; save the file as UTF-8")
    return (f"{path}: {where}: byte 0x{raw[err.start]:02x} at offset {err.start} is not valid "
            f"UTF-8{hint}")


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - an unreadable file is a user error, named
        raise CatalogError(f"{path}: cannot read Parquet ({e})") from None
    for i, name in enumerate(table.column_names):
        if name.strip() not in TEXT_COLUMNS:
            continue
        col = table.column(i)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            if not (pa.types.is_integer(col.type) or pa.types.is_null(col.type)):
                bad = next((r for r, v in enumerate(col.to_pylist()) if v is not None), 0)
                raise CatalogError(f"{path}: column {name.strip()!r} has type {col.type}, expected text "
                                   f"(row {bad + 1}: {col[bad].as_py()!r})")
            col = col.cast(pa.string())
        table = table.set_column(i, name, col)
    return table.to_pandas()


def _read_csv(path: Path) -> pd.DataFrame:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CatalogError(_utf8_error(path, raw, e)) from None
    try:
        return pd.read_csv(io.StringIO(text.removeprefix("\ufeff")), dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - an unreadable CSV is a user error, named
        raise CatalogError(f"{path}: cannot parse CSV ({str(e).strip()})") from None


def _read_table(path: Path, required: list[str], what: str) -> pd.DataFrame:
    """A manifest table (CSV: UTF-8 with or without a BOM, quoted fields may hold newlines; or
    Parquet): text columns as stripped str (blank -> None), extra columns kept, and the source row
    of every record in ROW (CSV: as a spreadsheet numbers them, the header is row 1; Parquet: from 1)."""
    if not path.is_file():
        raise CatalogError(f"{path}: {what} file not found")
    parquet = path.suffix.lower() == ".parquet"
    df = _read_parquet(path) if parquet else _read_csv(path)
    df.columns = [str(c).strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            raise CatalogError(f"{path}: missing column '{col}' (has: {', '.join(df.columns)})")
    for col in df.columns:
        if parquet and col not in TEXT_COLUMNS:
            continue   # Parquet extras keep their types
        df[col] = df[col].map(lambda v: (v.strip() or None) if isinstance(v, str) else v)
    df[ROW] = df.index + (1 if parquet else 2)
    return df


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


def load_manifest(root: str | Path, category_separator: str = DEFAULT_SEPARATOR) -> Source:
    """A directory in the data contract: items, images and optional queries as .csv or .parquet.
    Categories are split by `category_separator`; `category` gets the normalised key and
    `category_display` the text as given. Rows are checked at ingest (data/ingest.py)."""
    sep = separator(category_separator)
    root = Path(root).resolve()
    if not root.is_dir():
        raise CatalogError(f"{root}: manifest directory not found")
    items_path = table_file(root, "items", "items")
    items = _read_table(items_path, ["item_id", "title", "category"], "items")
    for col in ("group_id", "split"):
        if col not in items.columns:
            items[col] = None
    if "category_display" not in items.columns:
        items.insert(list(items.columns).index("category") + 1, "category_display", items["category"])
    items["category"] = items["category"].map(lambda c: category_key(c, sep) if c is not None else None)
    items["split"] = items["split"].map(lambda s: s.lower() if isinstance(s, str) else None)
    images_path = table_file(root, "images", "images")
    images = _read_table(images_path, ["item_id", "image"], "images")
    missing = images["image"].isna()
    if missing.any():
        raise CatalogError(f"{images_path}: empty 'image' value on row(s) "
                           f"{list(images.loc[missing, ROW][:5])}")
    checked = _catalog_files(root, images["image"])
    images["source_path"], images["refused"] = checked["path"], checked["refused"]
    images["view"] = images["view"].fillna(CATALOG_VIEW) if "view" in images else CATALOG_VIEW
    images = images.drop(columns=["image", ROW])
    queries = None
    queries_path = table_file(root, "queries", "queries", required=False)
    if queries_path is not None:
        queries = _read_table(queries_path, ["query_id", "item_id"], "queries").drop(columns=[ROW])
        if "image" not in queries and "text" not in queries:
            raise CatalogError(f"{queries_path}: needs an 'image' or a 'text' column")
        for col in ("image", "text"):
            if col not in queries:
                queries[col] = None
        empty = queries["image"].isna() & queries["text"].isna()
        if empty.any():
            raise CatalogError(f"{queries_path}: query {queries['query_id'][empty].iloc[0]!r} "
                               "has neither image nor text")
        checked = _catalog_files(root, queries["image"])
        queries["image"], queries["refused"] = checked["path"], checked["refused"]
    return Source("manifest", root, items, images, queries,
                  meta={"manifest": str(root), "items_file": items_path.name,
                        "category_separator": sep})


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


def load_source(params: dict, paths: Paths, root: str | Path | None = None) -> Source:
    """The configured source; `root` overrides dataset.root (one shard of a sharded catalog, data/shards.py)."""
    ds = params["dataset"]
    kind = ds["source"]
    root = root if root is not None else ds["root"]
    if kind == "openclipart":
        src = load_openclipart(root)
    elif kind == "manifest":
        src = load_manifest(root, ds.get("category_separator", DEFAULT_SEPARATOR))
    elif kind == "synthetic":
        src = load_synthetic(ds["synthetic"], params["seed"], paths)
    else:
        raise CatalogError(f"unknown dataset source {kind!r}: use openclipart, manifest or synthetic")
    return sample_items(src, ds.get("limit"), params["seed"])


def tree_fingerprint(root: Path) -> str:
    """Every file's relative path, size and mtime under root, hashed: nothing is read or decoded, so
    a 10k-file tree takes well under a second."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            h.update(f"{os.path.relpath(os.path.join(dirpath, f), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def source_fingerprint(params: dict) -> str:
    """A cheap content fingerprint of the catalog source, for the Dagster sensor that retrains on
    a new catalog version: tree_fingerprint of the source root (openclipart tree or manifest
    directory); synthetic catalogs are fingerprinted by their params."""
    ds = params["dataset"]
    if ds["source"] == "synthetic":
        return fingerprint([ds["synthetic"], params["seed"]])
    root = Path(ds["root"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"catalog source {root} is not a directory")
    return tree_fingerprint(root)
