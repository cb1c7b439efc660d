"""The catalog validation rules on the images table (and its links to items), in the order they are
reported (IMAGE_RULES).

Membership of images.item_id in items.item_id is precomputed as a boolean column and checked with
ExpectColumnValuesToBeInSet([True]): passing an 8,000-id value_set to GX costs about a second of
pydantic serialization per call (and grows with the catalog), the boolean column costs nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data.schema import CATALOG_VIEW, IMAGE_COLUMNS, STATUS_OK, STATUS_QUARANTINED
from data.validation_gx import INT_TYPES, MAX_EXAMPLES, STRING_TYPES, Config, Result, Rule, \
    RulePlan, Tables, Verdict, as_float, as_str, empty, equals, gx_meta, jsonable, not_checked, pct, \
    quote_list, schema_verdict, shape_problems, tidy_number

DIMENSION_COLUMNS = ["status", "width", "height", "orig_width", "orig_height"]


class ImagesSchema(Rule):
    name = "images_schema"
    severity = "error"
    description = ("images has rows and every image column with its dtype, unique non-null "
                   "image_ids, known status values, and only item_ids found in items")

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        gxe, items, images = p.gxe, t.items, t.images
        p.expect("images", "rows", gxe.ExpectTableRowCountToBeBetween(min_value=1))
        for col, dtype in IMAGE_COLUMNS.items():
            p.expect("images", f"exists:{col}", gxe.ExpectColumnToExist(column=col))
            if col in images.columns:
                types = INT_TYPES if dtype.lower().startswith(("int", "uint")) else STRING_TYPES
                p.expect("images", f"type:{col}",
                         gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=types))
        if "image_id" in images.columns:
            p.expect("images", "image_id_not_null", gxe.ExpectColumnValuesToNotBeNull(column="image_id"))
            p.expect("images", "image_id_unique", gxe.ExpectColumnValuesToBeUnique(column="image_id"))
        if "status" in images.columns:
            p.expect("images", "status_not_null", gxe.ExpectColumnValuesToNotBeNull(column="status"))
            p.expect("images", "status_values",
                     gxe.ExpectColumnValuesToBeInSet(column="status",
                                                     value_set=[STATUS_OK, STATUS_QUARANTINED]))
        if "item_id" in images.columns and "item_id" in items.columns:
            known_ids = set(as_str(items["item_id"]).dropna())
            image_items = as_str(images["item_id"])
            refs = pd.DataFrame({"item_id": image_items,
                                 "item_known": image_items.isin(known_ids) & image_items.notna()})
            if "image_id" in images.columns:
                refs.insert(0, "image_id", images["image_id"])
            p.frame("image_refs", refs, ["image_id", "item_id"])
            p.expect("image_refs", "item_id_known",
                     gxe.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True]))
        elif "item_id" in images.columns:
            return {"not_checked": ["images.item_id in items.item_id (items has no item_id column)"]}
        return {"not_checked": []}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        images, dupe_cols = t.images, t.image_dupe_cols
        missing = [c for c in IMAGE_COLUMNS if not res[f"exists:{c}"].success]
        bad_types = {c: res[f"type:{c}"].observed or "values of the wrong type"
                     for c in IMAGE_COLUMNS if f"type:{c}" in res and not res[f"type:{c}"].success}
        meta = {"rows": len(images), "missing_columns": missing, "bad_dtypes": bad_types,
                "duplicate_columns": dupe_cols, "not_checked": facts["not_checked"], **gx_meta(res)}
        problems = shape_problems(res, missing, [f"column {col!r} is not {IMAGE_COLUMNS[col]}-typed (observed {observed})"
                                                 for col, observed in bad_types.items()], dupe_cols)
        r = res.get("image_id_not_null")
        if r is not None and not r.success:
            problems.append(f"{r.unexpected_count} null image_id(s)")
        r = res.get("image_id_unique")
        if r is not None and not r.success:
            dup = sorted(set(map(str, r.examples)))
            meta["duplicate_image_id_examples"] = dup
            problems.append(f"{r.unexpected_count} rows share a duplicated image_id "
                            f"(e.g. {quote_list(dup)})")
        r = res.get("status_not_null")
        if r is not None and not r.success:
            problems.append(f"{r.unexpected_count} null status value(s)")
        r = res.get("status_values")
        if r is not None and not r.success:
            vals = sorted(set(map(str, r.examples)))
            meta["bad_status_examples"] = vals
            problems.append(f"{r.unexpected_count} status value(s) not in "
                            f"{[STATUS_OK, STATUS_QUARANTINED]} (e.g. {quote_list(vals)})")
        r = res.get("item_id_known")
        if r is not None and not r.success:
            unknown = sorted({str(e.get("item_id")) for e in r.index_examples if isinstance(e, dict)})
            meta["unknown_item_id_count"] = r.unexpected_count
            meta["unknown_item_id_examples"] = unknown
            meta["unknown_item_image_examples"] = r.index_examples
            problems.append(f"{r.unexpected_count} image(s) reference item_ids not in items "
                            f"(e.g. {quote_list(unknown)})")
        if facts["not_checked"]:
            problems.append("not checked: " + "; ".join(facts["not_checked"]))
        return schema_verdict("images", problems, res, meta,
                              f"images: {len(images)} rows, all {len(IMAGE_COLUMNS)} columns present with "
                              f"expected dtypes, image_ids unique, every item_id is a known item")


class ImagesDecode(Rule):
    name = "images_decode"
    severity = "error"
    description = "the share of images quarantined at ingest is at most validation.quarantine_max_share"

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        images = t.images
        if "status" not in images.columns:
            return {"missing": ["status"]}
        decode = pd.DataFrame({"status": as_str(images["status"]).fillna("<null>")})
        if "image_id" in images.columns:
            decode.insert(0, "image_id", images["image_id"])
        p.frame("decode", decode, ["image_id"])
        p.expect("decode", "status_ok",
                 p.gxe.ExpectColumnValuesToBeInSet(column="status", value_set=[STATUS_OK],
                                                   mostly=cfg.mostly))
        not_ok = decode["status"] != STATUS_OK
        reasons = (as_str(images["reason"]) if "reason" in images.columns
                   else pd.Series(pd.NA, index=images.index, dtype=pd.StringDtype()))
        reasons = reasons[not_ok].fillna("(no reason)")
        ids = (images["image_id"] if "image_id" in images.columns
               else pd.Series(images.index.astype(str), index=images.index))
        return {"missing": [],
                "reason_counts": {str(k): int(v) for k, v in reasons.value_counts().items()},
                "examples": [{"image_id": jsonable(i), "reason": r}
                             for i, r in zip(ids[not_ok].head(MAX_EXAMPLES),
                                             reasons.head(MAX_EXAMPLES))]}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        if facts["missing"]:
            return not_checked("images", facts["missing"])
        if t.images.empty:
            return empty("images", {"total": 0, "quarantined": 0})
        r = res["status_ok"]
        total = r.element_count or 0
        quarantined = r.unexpected_count or 0
        share = quarantined / total if total else 0.0
        reasons = facts["reason_counts"]
        meta = {"total": total, "quarantined": quarantined, "share": share,
                "max_share": cfg.quarantine_max_share, "unexpected_percent": r.unexpected_percent,
                "reason_counts": reasons, "examples": facts["examples"], **gx_meta(res)}
        by_reason = ", ".join(f"{n} {reason}" for reason, n in list(reasons.items())[:5])
        if len(reasons) > 5:
            by_reason += ", ..."
        cmp = "<=" if r.success else ">"
        desc = (f"{quarantined} of {total} images quarantined ({pct(share)} {cmp} "
                f"{pct(cfg.quarantine_max_share)} allowed)")
        if by_reason:
            desc += f": {by_reason}"
        if r.exception:
            desc += f"; GX error {r.exception}"
        return r.success, desc, meta


class ImageDimensions(Rule):
    name = "image_dimensions"
    severity = "error"
    description = ("every ok image is within the ingest bounds: max_side, min_side, max_pixels "
                   "and max_aspect")

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        missing = [c for c in DIMENSION_COLUMNS if c not in t.images.columns]
        if missing:
            return {"missing": missing}
        gxe = p.gxe
        ok = t.images[equals(t.images["status"], STATUS_OK)]
        # float, so that nulls survive next to the derived pixel count and aspect ratio
        dims = pd.DataFrame({c: as_float(ok[c]) for c in DIMENSION_COLUMNS[1:]})
        lo = np.fmin(dims["orig_width"], dims["orig_height"])
        hi = np.fmax(dims["orig_width"], dims["orig_height"])
        with np.errstate(divide="ignore", invalid="ignore"):
            dims["orig_pixels"] = dims["orig_width"] * dims["orig_height"]
            dims["orig_aspect"] = np.where(lo > 0, hi / lo, np.where(hi > 0, np.inf, np.nan))
        if "image_id" in ok.columns:
            dims.insert(0, "image_id", ok["image_id"].to_numpy())
        p.frame("ok_dims", dims, ["image_id"])
        for col in DIMENSION_COLUMNS[1:]:
            p.expect("ok_dims", f"{col} not null", gxe.ExpectColumnValuesToNotBeNull(column=col))
        for col in ("width", "height"):
            p.expect("ok_dims", f"{col} in [1, {cfg.max_side}]",
                     gxe.ExpectColumnValuesToBeBetween(column=col, min_value=1, max_value=cfg.max_side))
        for col in ("orig_width", "orig_height"):
            p.expect("ok_dims", f"{col} >= {cfg.min_side}",
                     gxe.ExpectColumnValuesToBeBetween(column=col, min_value=cfg.min_side))
        p.expect("ok_dims", f"orig_width*orig_height <= {cfg.max_pixels}",
                 gxe.ExpectColumnValuesToBeBetween(column="orig_pixels", max_value=cfg.max_pixels))
        p.expect("ok_dims", f"orig aspect <= {cfg.max_aspect:g}",
                 gxe.ExpectColumnValuesToBeBetween(column="orig_aspect", max_value=cfg.max_aspect))
        return {"missing": [], "ok_images": len(dims)}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        if facts["missing"]:
            return not_checked("images", facts["missing"])
        if t.images.empty:
            return empty("images")
        n_ok = facts["ok_images"]
        meta = {"ok_images": n_ok, **gx_meta(res)}
        failed = {label: r for label, r in res.items() if not r.success}
        if not failed:
            return True, f"all {n_ok} ok images within size, pixel and aspect bounds", meta
        meta["violations"] = {
            label: {"count": r.unexpected_count, "values": [tidy_number(v) for v in r.examples],
                    "image_ids": [e.get("image_id") for e in r.index_examples if isinstance(e, dict)]}
            for label, r in failed.items()}
        parts = []
        for label, r in failed.items():
            ids = meta["violations"][label]["image_ids"]
            part = f"{label}: {r.unexpected_count} violation(s)" if not r.exception \
                else f"{label}: GX error {r.exception}"
            values = meta["violations"][label]["values"]
            if values:
                part += f" (e.g. {quote_list(values)}"
                part += f" at image_id {quote_list(ids, 1)})" if ids else ")"
            parts.append(part)
        return False, f"ok images out of bounds ({n_ok} checked): " + "; ".join(parts), meta


class ItemsHaveImages(Rule):
    name = "items_have_images"
    severity = "error"
    description = (f"the share of items without an ok {CATALOG_VIEW!r} image is at most "
                   "validation.quarantine_max_share (those items are dropped downstream)")

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        items, images = t.items, t.images
        missing = ([f"items.{c}" for c in ["item_id"] if c not in items.columns]
                   + [f"images.{c}" for c in ["item_id", "status", "view"] if c not in images.columns])
        if missing:
            return {"missing": missing}
        usable = equals(images["status"], STATUS_OK) & equals(images["view"], CATALOG_VIEW)
        counts = as_str(images["item_id"])[usable].value_counts()
        item_ids = as_str(items["item_id"])
        coverage = pd.DataFrame({"item_id": item_ids,
                                 "ok_catalog_images": item_ids.map(counts).fillna(0).astype("int64")})
        p.frame("coverage", coverage, ["item_id"])
        p.expect("coverage", "has_ok_catalog_image",
                 p.gxe.ExpectColumnValuesToBeBetween(column="ok_catalog_images", min_value=1,
                                                     mostly=cfg.mostly))
        return {"missing": []}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        if facts["missing"]:
            cols = ", ".join(repr(c) for c in facts["missing"])
            return False, f"not checked: column(s) {cols} missing", {"missing_columns": facts["missing"]}
        if t.items.empty:
            return empty("items")
        r = res["has_ok_catalog_image"]
        total = r.element_count or 0
        without = r.unexpected_count or 0
        share = without / total if total else 0.0
        examples = [e.get("item_id") for e in r.index_examples if isinstance(e, dict)]
        meta = {"items": total, "without_ok_catalog_image": without, "share": share,
                "max_share": cfg.quarantine_max_share, "unexpected_percent": r.unexpected_percent,
                "example_item_ids": examples, **gx_meta(res)}
        cmp = "<=" if r.success else ">"
        desc = (f"{total - without} of {total} items have an ok {CATALOG_VIEW!r} image; "
                f"{without} without ({pct(share)} {cmp} {pct(cfg.quarantine_max_share)} allowed)")
        if t.images.empty:
            desc += "; images table is empty"
        if examples and without:
            desc += f", e.g. {quote_list(examples)}"
        if r.success and without:
            desc += "; those items are dropped downstream"
        if r.exception:
            desc += f"; GX error {r.exception}"
        return r.success, desc, meta


class DuplicateImages(Rule):
    name = "duplicate_images"
    severity = "warn"   # same bytes under two items is worth a look, not a reason to stop
    description = "no byte-identical (sha256) ok image is shared by different items"

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        images = t.images
        missing = [c for c in ["sha256", "item_id", "status"] if c not in images.columns]
        if missing:
            return {"missing": missing}
        ok = images[equals(images["status"], STATUS_OK)]
        # one row per (sha256, item): the same bytes twice inside one item are not a duplicate
        owners = (pd.DataFrame({"sha256": as_str(ok["sha256"]), "item_id": as_str(ok["item_id"])})
                  .dropna(subset=["sha256"]).drop_duplicates().reset_index(drop=True))
        p.frame("sha_owners", owners, ["item_id"])
        p.expect("sha_owners", "sha256_unique_across_items",
                 p.gxe.ExpectColumnValuesToBeUnique(column="sha256"))
        shared = owners[owners["sha256"].duplicated(keep=False)]
        groups = shared.groupby("sha256", sort=True)["item_id"].agg(list)
        return {"missing": [], "ok_images": len(ok), "groups": len(groups),
                "items_involved": len({i for ids in groups for i in ids}),
                "examples": [{"sha256": sha[:12], "item_ids": sorted(str(i) for i in ids)[:5],
                              "n_items": len(ids)}
                             for sha, ids in groups.head(MAX_EXAMPLES).items()]}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        if facts["missing"]:
            return not_checked("images", facts["missing"])
        if t.images.empty:
            return empty("images")
        r = res["sha256_unique_across_items"]
        meta = {"ok_images": facts["ok_images"], "duplicate_groups": facts["groups"],
                "items_involved": facts["items_involved"], "examples": facts["examples"],
                **gx_meta(res)}
        if r.success:
            return (True, f"no byte-identical ok images shared by different items "
                          f"({facts['ok_images']} ok images)", meta)
        shown = "; ".join(f"{e['sha256']}: {', '.join(e['item_ids'])}" for e in facts["examples"][:3])
        desc = (f"{facts['groups']} sha256 value(s) shared by different items "
                f"({facts['items_involved']} items involved)")
        if shown:
            desc += f", e.g. {shown}"
        if r.exception:
            desc += f"; GX error {r.exception}"
        return False, desc, meta


IMAGE_RULES: list[Rule] = [ImagesSchema(), ImagesDecode(), ImageDimensions(), ItemsHaveImages(),
                           DuplicateImages()]
