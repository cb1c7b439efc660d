"""Source -> normalized catalog directory (data/schema.py): check every item row (a bad one is
quarantined with its reason, its images with it), decode every image safely in parallel,
quarantine the bad ones with their reason, join openclipart twins, write the tables atomically."""
from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import imagehash
import pandas as pd
from tqdm import tqdm

from data.images import normalize_file, quarantined
from data.schema import (IMAGE_COLUMNS, ITEM_COLUMNS, ITEM_QUARANTINE_COLUMNS, QUARANTINE_COLUMNS,
                         SPLITS, STATUS_OK, Catalog, CatalogError, coerce, reason_class)
from data.sources import ROW, Source
from data.taxonomy import DEFAULT_MAX_DEPTH, normalize_text, path_problem
from core.config import fingerprint
from core.io import atomic_path, write_json

log = logging.getLogger(__name__)


def normalize_all(paths: list[str], out_dir: Path, cfg: dict, reuse_dir: Path | None,
                  desc: str = "images") -> list[dict]:
    """normalize_file over many paths, in `cfg['workers']` processes, with a progress bar."""
    fn = partial(normalize_file, out_dir=str(out_dir), cfg=cfg,
                 reuse_dir=str(reuse_dir) if reuse_dir else None)
    bar = dict(total=len(paths), desc=desc, unit="img", mininterval=2.0, disable=None)
    if cfg.get("workers", 1) <= 1 or len(paths) < 64:
        return [fn(p) for p in tqdm(paths, **bar)]
    with ProcessPoolExecutor(max_workers=cfg["workers"]) as pool:
        return list(tqdm(pool.map(fn, paths, chunksize=32), **bar))


def normalize_checked(paths: list[str], refused: list[str | None], out_dir: Path, cfg: dict,
                      reuse_dir: Path | None, desc: str = "images") -> list[dict]:
    """normalize_all over the paths the source accepted; a refused one (outside the catalog, a URL:
    `refused` holds the reason) is quarantined without being touched."""
    refused = [None if pd.isna(r) else r for r in refused]
    done = iter(normalize_all([p for p, r in zip(paths, refused) if r is None], out_dir, cfg, reuse_dir, desc))
    return [next(done) if r is None else quarantined(p, r) for p, r in zip(paths, refused)]


def _refused(df: pd.DataFrame) -> list:
    """The `refused` column of a source table (sources that check nothing have none)."""
    return df["refused"].tolist() if "refused" in df else [None] * len(df)


# item row reasons (the class before any " (detail)"), each with the validation rule it breaks
MISSING_ID, DUPLICATE_ID = "missing item_id", "duplicate item_id"
MISSING_TITLE = "missing title"
EMPTY_CATEGORY, BAD_CATEGORY = "empty category", "malformed category path"
UNKNOWN_SPLIT = "unknown split value"
ITEM_REASON_RULES = {MISSING_ID: "unique_item_id", DUPLICATE_ID: "unique_item_id",
                     MISSING_TITLE: "titles_non_empty", EMPTY_CATEGORY: "category_format",
                     BAD_CATEGORY: "category_format", UNKNOWN_SPLIT: "items_schema"}
DEFAULT_TITLE_MAX_CHARS = 500


def _text(value, clean) -> str | None:
    """clean(str(value)), None for a null or for what cleans to ""."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return clean(str(value)) or None


def screen_items(items: pd.DataFrame, validation: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(usable items, quarantined rows, stats). Titles are NFKC-normalised with whitespace runs
    (newlines too) made one space, and cut to validation.title_max_chars; a row is quarantined, with
    the first reason that applies, for: missing item_id, duplicate item_id (every row of an id given
    more than once: which row its images belong to is unknowable), missing title (shorter than
    validation.title_min_chars), empty category, malformed category path (an empty level, more than
    validation.category_max_depth levels), unknown split value. `category` must hold the normalised
    key (data/taxonomy.py) already. `validation`: params["validation"]."""
    v = validation
    max_chars = int(v.get("title_max_chars") or DEFAULT_TITLE_MAX_CHARS)
    min_chars = int(v.get("title_min_chars", 1))
    max_depth = int(v.get("category_max_depth") or DEFAULT_MAX_DEPTH)
    items = items.reset_index(drop=True).copy()
    if ROW not in items.columns:
        items[ROW] = pd.NA
    ids = items["item_id"].map(lambda i: _text(i, str.strip))
    items["item_id"] = ids
    titles = items["title"].map(lambda t: _text(t, normalize_text))
    long = titles.map(lambda t: t is not None and len(t) > max_chars)
    items["title"] = titles.map(lambda t: t[:max_chars].rstrip() if t is not None and len(t) > max_chars
                                else t)
    counts = ids.value_counts()
    reasons = []
    for r in items.itertuples(index=False):
        item_id, title, category, split = (getattr(r, c) for c in ("item_id", "title", "category", "split"))
        if item_id is None:
            reason = MISSING_ID
        elif counts[item_id] > 1:
            reason = f"{DUPLICATE_ID} ({counts[item_id]} rows)"
        elif title is None or len(title.strip()) < min_chars:
            reason = MISSING_TITLE
        elif (problem := path_problem(category if isinstance(category, str) else None, max_depth)):
            reason = problem
        elif isinstance(split, str) and split not in SPLITS:
            reason = f"{UNKNOWN_SPLIT} ({split!r}; allowed: {', '.join(SPLITS)})"
        else:
            reason = None
        reasons.append(reason)
    bad = pd.Series(reasons, index=items.index, dtype=object).notna()
    q = items[bad]
    display = "category_display" if "category_display" in items.columns else "category"
    quarantine = pd.DataFrame({"item_id": q["item_id"], "row": q[ROW],
                               "reason": [reasons[i] for i in q.index],
                               "rule": [ITEM_REASON_RULES[reason_class(reasons[i])] for i in q.index],
                               "title": q["title"], "category": q[display], "split": q["split"]})
    kept = items[~bad].drop(columns=[ROW]).reset_index(drop=True)
    stats = {"item_rows": len(items), "items_quarantined": int(bad.sum()),
             "item_quarantine_reasons": {k: int(n) for k, n in
                                         quarantine["reason"].map(reason_class).value_counts().items()},
             "titles_truncated": int((long & ~bad).sum()), "title_max_chars": max_chars}
    return kept, quarantine.reset_index(drop=True), stats


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # smallest id names the group: deterministic


def twin_key(stem: str) -> tuple[str, bool]:
    """Name key of an openclipart file without its black-and-white marker, and whether it had one:
    cone1_bw_x -> ("cone1_x", True)."""
    tokens = [t for t in stem.lower().replace("-", "_").split("_") if t]
    return "_".join(t for t in tokens if t != "bw"), "bw" in tokens


def group_twins(items: pd.DataFrame, images: pd.DataFrame, max_distance: int) -> pd.Series:
    """group_id per item. Joined: byte-identical images; the `_bw` version of a colour original
    (same name key, one marked bw, aspect ratios within 15%); one icon exported at several sizes
    (same name key, normalized images within max_distance dHash bits)."""
    uf = _UnionFind()
    ok = images[images["status"] == STATUS_OK]
    for _, ids in ok.groupby("sha256")["item_id"]:
        for other in ids.iloc[1:]:
            uf.union(ids.iloc[0], other)
    info = {r.item_id: (imagehash.hex_to_hash(r.dhash), r.orig_width / r.orig_height)
            for r in ok.itertuples()}
    by_key: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for r in items.itertuples():
        if r.item_id in info:
            key, bw = twin_key(r.file_stem)
            by_key[key].append((r.item_id, bw))
    for members in by_key.values():
        for i, (a, a_bw) in enumerate(members):
            for b, b_bw in members[i + 1:]:
                (ha, ra), (hb, rb) = info[a], info[b]
                if a_bw != b_bw and abs(ra / rb - 1) <= 0.15 or ha - hb <= max_distance:
                    uf.union(a, b)
    return items["item_id"].map(uf.find)


def catalog_fingerprint(items: pd.DataFrame, images: pd.DataFrame) -> str:
    """Content fingerprint: changes when any item field or any image's bytes change."""
    it = items[list(ITEM_COLUMNS)].astype(str).sort_values("item_id").values.tolist()
    im = images[["item_id", "view", "sha256"]].astype(str).sort_values(["item_id", "sha256"]).values.tolist()
    return fingerprint([it, im])


def build_catalog(src: Source, out_dir: str | Path, ingest: dict, validation: dict,
                  reuse_dir: Path | None = None, meta_extra: dict | None = None) -> Catalog:
    """Write the normalized catalog of `src` to out_dir (atomically) and return it.
    `ingest`, `validation`: params["ingest"], params["validation"]. Normalized images are reused
    from reuse_dir (default: out_dir's current version); meta_extra joins meta.json."""
    out_dir = Path(out_dir)
    cfg = ingest
    if src.items.empty:
        raise CatalogError(f"{src.root}: the catalog has no items")
    items, item_q, item_stats = screen_items(src.items, validation)
    images = src.images.reset_index(drop=True).copy()
    if len(item_q):   # the images of a quarantined row go with it, undecoded
        per_item = images["item_id"].value_counts()
        item_q["images"] = item_q["item_id"].map(per_item).fillna(0).astype("int64")
        images = images[~images["item_id"].isin(set(item_q["item_id"].dropna()))].reset_index(drop=True)
    item_q = coerce(item_q, ITEM_QUARANTINE_COLUMNS)
    images["image_id"] = images["item_id"] + "-" + images.groupby("item_id").cumcount().astype(str)
    reuse = reuse_dir or (out_dir if out_dir.is_dir() else None)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        recs = pd.DataFrame(normalize_checked(images["source_path"].tolist(), _refused(images), tmp, cfg,
                                              reuse, desc=f"{src.name} images"))
        images = pd.concat([images.drop(columns=["source_path", "refused"], errors="ignore"), recs], axis=1)
        if src.auto_group:
            items["group_id"] = group_twins(items, images, cfg["twin_hash_distance"])
        items["group_id"] = items["group_id"].fillna(items["item_id"])
        items = coerce(items.drop(columns=["file_stem"], errors="ignore"), ITEM_COLUMNS)
        images = coerce(images, IMAGE_COLUMNS)
        quarantine = images.loc[images["status"] != STATUS_OK, QUARANTINE_COLUMNS].reset_index(drop=True)
        items.to_parquet(tmp / "items.parquet", index=False)
        images.to_parquet(tmp / "images.parquet", index=False)
        quarantine.to_parquet(tmp / "quarantine.parquet", index=False)
        item_q.to_parquet(tmp / "item_quarantine.parquet", index=False)
        if src.queries is not None:
            _write_queries(src.queries, tmp, cfg)
        meta = {"source": src.name, "synthetic": src.synthetic, "root": str(src.root),
                "fingerprint": catalog_fingerprint(items, images), "items": len(items),
                "images": len(images), "instances": int(items["group_id"].nunique()),
                "quarantined": len(quarantine), **item_stats,
                **{f"source_{k}": v for k, v in src.meta.items()}, **(meta_extra or {})}
        write_json(meta, tmp / "meta.json")
    log.info("catalog %s: %d items (%d rows quarantined), %d images, %d quarantined", out_dir, len(items),
             len(item_q), len(images), len(quarantine))
    return Catalog.load(out_dir)


def _write_queries(queries: pd.DataFrame, out_dir: Path, cfg: dict) -> None:
    """A manifest's own queries, used as given: images normalized like catalog images (a bad query
    image is recorded with its reason), text kept verbatim."""
    q = queries.reset_index(drop=True).copy()
    has_img = q["image"].notna()
    recs = normalize_checked(q.loc[has_img, "image"].tolist(), _refused(q[has_img]), out_dir, cfg, None,
                             desc="query images")
    q = q.drop(columns=["refused"], errors="ignore")
    q["source_image"] = q["image"]
    q["image"], q["status"], q["reason"] = None, STATUS_OK, None
    for idx, rec in zip(q.index[has_img], recs):
        q.loc[idx, ["image", "status", "reason"]] = [rec["path"], rec["status"], rec["reason"]]
    q.astype({"query_id": "string", "item_id": "string"}).to_parquet(out_dir / "queries.parquet", index=False)
