"""Data stages: raw_catalog -> validated_catalog -> splits -> query_sets (and the raw catalog's
validation rules), each calling data/ functions."""
from __future__ import annotations

import base64
import logging
import time
from functools import partial
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image

from data.ingest import build_catalog
from data.queries import build_query_sets, image_queries
from data.schema import CATALOG_VIEW, STATUS_OK, Catalog, CatalogError, reason_class, shards_union_meta
from data.shards import requested, source_shards
from data.sources import load_source, tree_fingerprint
from data.splits import assign_splits
from data.validation import CheckOutcome, failed_errors, validate_catalog
from core.config import Paths, fingerprint
from core.io import atomic_path, link_tree, write_json, write_parquet
from core.tracking import start_run
from pailitao.stages import StageResult, finish, md_table, rebuild_shards, shard_info

log = logging.getLogger(__name__)


class ValidationFailed(CatalogError):
    """Blocking validation rules failed; the message lists each one."""


def quarantine_summary(catalog: Catalog) -> str:
    q = catalog.quarantine
    if q.empty:
        return "No image quarantined."
    reasons = q["reason"].map(reason_class).value_counts()
    head = f"{len(q)} of {len(catalog.images)} images quarantined ({len(q) / len(catalog.images):.2%}).\n\n"
    return (head + reasons.rename_axis("reason").reset_index().to_markdown(index=False)
            + "\n\nExamples:\n\n" + md_table(q[["item_id", "reason"]], 10))


def item_quarantine_summary(catalog: Catalog) -> str:
    """The item rows quarantined at ingest: counts by reason (with the rule each breaks), examples."""
    q = catalog.item_quarantine
    rows = int(catalog.meta.get("item_rows", len(catalog.items)))
    truncated = int(catalog.meta.get("titles_truncated", 0) or 0)
    tail = (f"\n\n{truncated} title(s) cut to {catalog.meta.get('title_max_chars')} characters."
            if truncated else "")
    if q is None or q.empty:
        return "No item row quarantined." + tail
    reasons = (q.assign(reason=q["reason"].map(reason_class))
               .groupby(["reason", "rule"]).size().rename("rows").sort_values(ascending=False))
    head = f"{len(q)} of {rows} item rows quarantined ({len(q) / max(rows, 1):.2%}).\n\n"
    return (head + reasons.reset_index().to_markdown(index=False)
            + "\n\nExamples:\n\n" + md_table(q[["item_id", "row", "reason"]], 10) + tail)


def _item_metrics(meta: dict) -> dict:
    rows = int(meta.get("item_rows", meta["items"]))
    n = int(meta.get("items_quarantined", 0))
    return {"item_rows": rows, "items_quarantined": n, "items_quarantined_share": n / max(rows, 1),
            "titles_truncated": int(meta.get("titles_truncated", 0) or 0),
            **{f"items_quarantined.{k.replace(' ', '_')}": int(v)
               for k, v in (meta.get("item_quarantine_reasons") or {}).items()}}


def raw_catalog(params: dict, dagster_run_id: str | None = None, *, shards: list[str] | None = None) -> StageResult:
    """Load the configured source and write the normalized catalog (bad images quarantined); a
    sharded source (dataset.sharded) one shard at a time: those asked for (default all) when their
    files or the ingest settings changed; the others stay, unless they left the source."""
    paths, t0 = Paths.from_params(params), time.perf_counter()
    if params["dataset"]["sharded"]:
        catalog, (shard_metrics, shard_meta) = _raw_shards(params, paths, shards)
    else:
        catalog = build_catalog(load_source(params, paths), paths.asset("raw_catalog"), params["ingest"],
                                params["validation"])
        shard_metrics, shard_meta = {}, {}
    m = catalog.meta
    res = StageResult("raw_catalog", catalog.root,
                      metrics={"items": m["items"], "images": m["images"], "instances": m["instances"],
                               "quarantined": m["quarantined"],
                               "quarantined_share": m["quarantined"] / max(m["images"], 1),
                               **_item_metrics(m), **shard_metrics,
                               "seconds": round(time.perf_counter() - t0, 2)},
                      info={"source": m["source"], "synthetic": m["synthetic"],
                            "fingerprint": m["fingerprint"], "root": m["root"], **shard_meta},
                      markdown={"preview": md_table(catalog.items),
                                "quarantine": quarantine_summary(catalog),
                                "item_quarantine": item_quarantine_summary(catalog)})
    with start_run("raw_catalog", params, m["fingerprint"], dagster_run_id) as run:
        mlflow.log_table(catalog.quarantine, "quarantine.json")
        if catalog.item_quarantine is not None and len(catalog.item_quarantine):
            mlflow.log_table(catalog.item_quarantine.astype(object).where(
                catalog.item_quarantine.notna(), None), "item_quarantine.json")
        return finish(res, run)


def _raw_shards(params: dict, paths: Paths, shards: list[str] | None) -> tuple[Catalog, tuple[dict, dict]]:
    """raw_catalog of a sharded source: a shard is ingested again only when its files (paths,
    sizes, mtimes) or the settings that shape it changed."""
    root, source = paths.asset("raw_catalog"), source_shards(params["dataset"])
    asked = requested(source, shards, params["dataset"]["root"])
    ds = params["dataset"]
    settings = [ds["source"], ds["limit"], ds["category_separator"], params["ingest"], params["validation"],
                params["seed"]]
    keys = {n: fingerprint([tree_fingerprint(source[n]), settings]) for n in asked}

    def ingest(name: str, dst: Path, prev: Path | None) -> None:
        build_catalog(load_source(params, paths, root=source[name]), dst, params["ingest"], params["validation"],
                      reuse_dir=prev, meta_extra={"shard_key": keys[name]})

    names, built = rebuild_shards(root, list(source), keys, ingest,
                                  partial(shards_union_meta, root=str(ds["root"])))
    return Catalog.load(root), shard_info(names, built, asked)


def check_raw_catalog(params: dict, shards: list[str] | None = None) -> list[CheckOutcome]:
    """The Great Expectations rules over the raw catalog, or over the union of `shards` of a sharded
    one (Dagster runs them as asset checks, over the run's partitions)."""
    return validate_catalog(Catalog.load(Paths.from_params(params).asset("raw_catalog"), shards),
                            params["validation"], params["ingest"])


def validated_catalog(params: dict, dagster_run_id: str | None = None, *,
                      shards: list[str] | None = None) -> StageResult:
    """The raw catalog minus quarantined images and items left without a catalog image (item rows
    quarantined at ingest are not in it, nor their images). Refuses to
    run when a blocking validation rule fails (in Dagster the blocking asset checks stop it first;
    the rules run again here so no caller can skip them). Of a sharded catalog, only the shards
    whose raw data (or the rules' settings) changed are validated, each alone, and written; the
    others stay as they are, and a failed shard leaves the last version in place."""
    paths = Paths.from_params(params)
    raw = Catalog.load(paths.asset("raw_catalog"))
    out = paths.asset("validated_catalog")
    shard_metrics, shard_meta = {}, {}
    if raw.shards:
        # a shard is validated again (alone) when its raw data or the rules' settings changed
        keys = {n: fingerprint([fp, params["validation"], params["ingest"]]) for n, fp in raw.meta["shards"].items()}
        outcomes = []

        def validate(name: str, dst: Path, prev: Path | None) -> None:
            shard = raw.shard(name)
            found = _validate(shard, params, name)
            outcomes.extend(found)
            _write_validated(shard, {o.name: o.passed for o in found}, dst, key=keys[name])

        names, built = rebuild_shards(out, raw.shards, keys, validate,
                                      partial(shards_union_meta, root=raw.meta["root"]))
        shard_metrics, shard_meta = shard_info(names, built, shards)
    else:
        outcomes = _validate(raw, params)
        with atomic_path(out) as tmp:
            _write_validated(raw, {o.name: o.passed for o in outcomes}, tmp)
    catalog = Catalog.load(out)
    meta = catalog.meta
    res = StageResult("validated_catalog", out,
                      metrics={"items": meta["items"], "images": meta["images"],
                               "instances": meta["instances"], "dropped_items": meta["dropped_items"],
                               "items_quarantined": int(meta.get("items_quarantined", 0)),
                               "titles_truncated": int(meta.get("titles_truncated", 0) or 0),
                               "checks_run": len(outcomes), "checks_passed": sum(o.passed for o in outcomes),
                               **shard_metrics},
                      info={"fingerprint": meta["fingerprint"], "synthetic": meta["synthetic"],
                            "source": meta["source"], **shard_meta},
                      markdown={"quarantine": quarantine_summary(catalog),
                                "item_quarantine": item_quarantine_summary(catalog),
                                "categories": catalog.items["category"].value_counts().head(15)
                                .rename_axis("category").reset_index().to_markdown(index=False)})
    with start_run("validated_catalog", params, meta["fingerprint"], dagster_run_id) as run:
        mlflow.log_dict({o.name: vars(o) for o in outcomes}, "checks.json")
        return finish(res, run)


def _validate(raw: Catalog, params: dict, shard: str | None = None) -> list[CheckOutcome]:
    """The validation rules' outcomes; ValidationFailed when an error-severity rule fails."""
    outcomes = validate_catalog(raw, params["validation"], params["ingest"])
    failed = failed_errors(outcomes)
    if failed:
        raise ValidationFailed(f"catalog{f' shard {shard!r}' if shard else ''} validation failed:\n" +
                               "\n".join(f"- {o.name}: {o.description}" for o in failed))
    return outcomes


def _write_validated(raw: Catalog, checks: dict, tmp: Path, *, key: str = "") -> None:
    """The validated form of one (unsharded) raw catalog into tmp; images are hard-linked."""
    tmp.mkdir(parents=True, exist_ok=True)
    images = raw.ok_images
    served = images.loc[images["view"] == CATALOG_VIEW, "item_id"].unique()
    items = raw.items[raw.items["item_id"].isin(served)].reset_index(drop=True)
    images = images[images["item_id"].isin(items["item_id"])].reset_index(drop=True)
    link_tree(raw.root / "images", tmp / "images")
    items.to_parquet(tmp / "items.parquet", index=False)
    images.to_parquet(tmp / "images.parquet", index=False)
    raw.quarantine.to_parquet(tmp / "quarantine.parquet", index=False)
    if raw.item_quarantine is not None:
        raw.item_quarantine.to_parquet(tmp / "item_quarantine.parquet", index=False)
    if raw.queries is not None:
        raw.queries.to_parquet(tmp / "queries.parquet", index=False)
    meta = {**raw.meta, "items": len(items), "images": len(images),
            "instances": int(items["group_id"].nunique()),
            "dropped_items": len(raw.items) - len(items), "checks": checks, **({"shard_key": key} if key else {})}
    write_json(meta, tmp / "meta.json")


def splits(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Deterministic train / val / test split by instance."""
    paths = Paths.from_params(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    table = assign_splits(catalog.items, params["splits"], params["seed"])
    out = paths.asset("splits")
    counts = table.groupby("split").agg(items=("item_id", "size"), instances=("group_id", "nunique"))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        table.to_parquet(tmp / "splits.parquet", index=False)
        write_json({"fingerprint": catalog.meta["fingerprint"], "counts": counts.to_dict("index")},
                   tmp / "meta.json")
    metrics = {f"{s}_{k}": int(counts.loc[s, k]) if s in counts.index else 0
               for s in ("train", "val", "test") for k in ("items", "instances")}
    res = StageResult("splits", out, metrics=metrics, info={"fingerprint": catalog.meta["fingerprint"]},
                      markdown={"splits": counts.reset_index().to_markdown(index=False)})
    with start_run("splits", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        return finish(res, run)


def sample_grid(queries: pd.DataFrame, root: Path, source: Catalog, n: int = 6, size: int = 112) -> Image.Image:
    """Rows: the catalog image, then one query per noise level, for n held-out instances."""
    levels = list(dict.fromkeys(queries["level"]))
    groups = list(dict.fromkeys(queries["group_id"]))[:n]
    grid = Image.new("RGB", (size * len(groups), size * (len(levels) + 1)), "white")
    paths = source.images.set_index("image_id")["path"]
    for c, g in enumerate(groups):
        rows = queries[queries["group_id"] == g]
        first = rows.iloc[0]
        cells = [source.image_file(paths[first["source_image_id"]])] if first["source_image_id"] in paths else [None]
        cells += [root / rows[rows["level"] == lv].iloc[0]["image"] if (rows["level"] == lv).any() else None
                  for lv in levels]
        for r, p in enumerate(cells):
            if p is not None and Path(p).is_file():
                im = Image.open(p).convert("RGB")
                im.thumbnail((size - 4, size - 4))
                grid.paste(im, (c * size + 2, r * size + 2))
    return grid


def query_sets(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Noisy val / test queries per level (or a manifest's own), with sparse graded judgments."""
    paths = Paths.from_params(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    table = pd.read_parquet(paths.asset("splits") / "splits.parquet")
    out = paths.asset("query_sets")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        queries, qrels = build_query_sets(catalog, table, params["queries"], params["noise"], params["seed"], tmp,
                                          params["ingest"]["workers"])
        write_parquet(queries, tmp / "queries.parquet")
        write_parquet(qrels, tmp / "qrels.parquet")
        write_json({"fingerprint": catalog.meta["fingerprint"], "queries": len(queries)}, tmp / "meta.json")
        if queries["source_image_id"].notna().any():   # the grid shows the photo query sets
            sample_grid(image_queries(queries), tmp, catalog).save(tmp / "preview.png")
    counts = queries.groupby(["split", "level"]).size()
    metrics = {f"{s}_{lv}": int(c) for (s, lv), c in counts.items()}
    metrics.update(queries=len(queries), with_text=int(queries["text"].notna().sum()),
                   mean_instance_docs=float(queries["n_instance"].mean()) if len(queries) else 0.0)
    md = {"queries": md_table(queries[["query_id", "split", "level", "text", "item_id"]], 12)}
    preview = out / "preview.png"
    if preview.is_file():
        md["sample_queries"] = ("Columns: held-out instances. Rows: catalog image, then "
                                + ", ".join(dict.fromkeys(image_queries(queries)["level"])) + ".\n\n"
                                + "![sample queries](data:image/png;base64,"
                                + base64.b64encode(preview.read_bytes()).decode() + ")")
    res = StageResult("query_sets", out, metrics=metrics, info={"fingerprint": catalog.meta["fingerprint"]},
                      markdown=md)
    with start_run("query_sets", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        if preview.is_file():
            mlflow.log_artifact(str(preview))
        return finish(res, run)
