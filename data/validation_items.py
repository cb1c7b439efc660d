"""The catalog validation rules on the items table, in the order they are reported (ITEM_RULES).

Item rows that break a rule at ingest (data/ingest.py screen_items) are quarantined there with their
reason; `items_quarantine` fails only when their share passes validation.item_quarantine_max_share.
The other rules check what was kept, and still catch a table that was never screened.
"""
from __future__ import annotations

import re

import pandas as pd

from data.schema import ITEM_COLUMNS, SPLITS, reason_class
from data.taxonomy import KEY_SEPARATOR
from data.validation_gx import MAX_EXAMPLES, STRING_TYPES, Config, Result, Rule, RulePlan, \
    Tables, Verdict, as_str, empty, exception_notes, failed, gx_meta, jsonable, not_checked, pct, quote_list, \
    schema_verdict, shape_problems


class ItemsSchema(Rule):
    name = "items_schema"
    severity = "error"
    description = "items has rows and every item column, string-typed, with split values in SPLITS"

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        gxe = p.gxe
        p.expect("items", "rows", gxe.ExpectTableRowCountToBeBetween(min_value=1))
        for col in ITEM_COLUMNS:
            p.expect("items", f"exists:{col}", gxe.ExpectColumnToExist(column=col))
            if col in t.items.columns:
                p.expect("items", f"type:{col}",
                         gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=STRING_TYPES))
        if "split" in t.items.columns:
            p.expect("items", "split_values",
                     gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
        return {}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        items, dupe_cols = t.items, t.item_dupe_cols
        missing = [c for c in ITEM_COLUMNS if not res[f"exists:{c}"].success]
        bad_types = {c: res[f"type:{c}"].observed or "non-string values"
                     for c in ITEM_COLUMNS if f"type:{c}" in res and not res[f"type:{c}"].success}
        meta = {"rows": len(items), "columns": list(items.columns), "missing_columns": missing,
                "bad_dtypes": bad_types, "duplicate_columns": dupe_cols, **gx_meta(res)}
        problems = shape_problems(res, missing, [
            f"column {col!r} is not string-typed (observed {observed}"
            + (f", e.g. {quote_list(res[f'type:{col}'].examples)})" if res[f"type:{col}"].examples else ")")
            for col, observed in bad_types.items()], dupe_cols)
        split = res.get("split_values")
        if split is not None and not split.success:
            meta["bad_split_count"] = split.unexpected_count
            meta["bad_split_examples"] = sorted(set(map(str, split.examples)))
            problems.append(f"{split.unexpected_count} split value(s) not in {list(SPLITS)} "
                            f"(e.g. {quote_list(meta['bad_split_examples'])})")
        return schema_verdict("items", problems, res, meta,
                              f"items: {len(items)} rows, columns {', '.join(ITEM_COLUMNS)} present and "
                              f"string-typed, split values in {{{', '.join(SPLITS)}}}")


class UniqueItemId(Rule):
    name = "unique_item_id"
    severity = "error"
    description = "every item_id is non-null and unique"

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        if "item_id" not in t.items.columns:
            return {"missing": ["item_id"]}
        p.expect("items", "not_null", p.gxe.ExpectColumnValuesToNotBeNull(column="item_id"))
        p.expect("items", "unique", p.gxe.ExpectColumnValuesToBeUnique(column="item_id"))
        return {"missing": []}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        items = t.items
        if facts["missing"]:
            return not_checked("items", facts["missing"])
        if items.empty:
            return empty("items")
        nulls, unique = res["not_null"], res["unique"]
        counts = as_str(items["item_id"]).dropna().value_counts()
        dup = counts[counts > 1]
        meta = {"rows": len(items), "null_count": int(items["item_id"].isna().sum()),
                "duplicated_ids": len(dup), "duplicated_rows": int(dup.sum()),
                "duplicate_examples": [{"item_id": k, "count": int(v)}
                                       for k, v in dup.head(MAX_EXAMPLES).items()], **gx_meta(res)}
        if nulls.success and unique.success:
            return True, f"all {len(items)} item_ids are non-null and unique", meta
        problems = []
        if not nulls.success:
            problems.append(f"{meta['null_count']} null item_id(s)")
        if not unique.success:
            problems.append(f"{len(dup)} item_id(s) duplicated over {int(dup.sum())} rows "
                            f"(e.g. {quote_list(list(dup.index))})")
        problems += exception_notes(res)
        return False, f"item_id of {len(items)} items: " + "; ".join(problems), meta


class TitlesNonEmpty(Rule):
    name = "titles_non_empty"
    severity = "error"
    description = "every title has at least validation.title_min_chars non-blank characters"

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        if "title" not in t.items.columns:
            return {"missing": ["title"]}
        titles = pd.DataFrame({"title": as_str(t.items["title"])})
        titles["title_stripped"] = titles["title"].str.strip()
        if "item_id" in t.items.columns:
            titles.insert(0, "item_id", t.items["item_id"])
        p.frame("titles", titles, ["item_id"])
        p.expect("titles", "not_null", p.gxe.ExpectColumnValuesToNotBeNull(column="title"))
        p.expect("titles", "min_chars",
                 p.gxe.ExpectColumnValueLengthsToBeBetween(column="title_stripped",
                                                           min_value=cfg.title_min_chars))
        return {"missing": []}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        items = t.items
        if facts["missing"]:
            return not_checked("items", facts["missing"])
        if items.empty:
            return empty("items")
        nulls, short = res["not_null"], res["min_chars"]
        n_null, n_short = nulls.unexpected_count or 0, short.unexpected_count or 0
        examples = [e.get("item_id") for e in nulls.index_examples + short.index_examples
                    if isinstance(e, dict)][:MAX_EXAMPLES]
        meta = {"rows": len(items), "min_chars": cfg.title_min_chars, "null_count": n_null,
                "too_short_count": n_short, "example_item_ids": examples,
                "too_short_examples": short.examples, **gx_meta(res)}
        if nulls.success and short.success:
            return (True, f"all {len(items)} titles have at least {cfg.title_min_chars} "
                          f"non-blank character(s)", meta)
        desc = (f"{n_null + n_short} of {len(items)} titles empty or shorter than "
                f"{cfg.title_min_chars} char(s) after stripping whitespace ({n_null} null, "
                f"{n_short} blank/short)")
        if examples:
            desc += f", e.g. item_id {quote_list(examples)}"
        return failed(desc, res, meta)


class CategoryFormat(Rule):
    name = "category_format"
    severity = "error"
    description = ("every category is a non-empty path of at most validation.category_max_depth "
                   "non-empty levels (matching validation.category_pattern, if set)")

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        if "category" not in t.items.columns:
            return {"missing": ["category"]}
        gxe = p.gxe
        p.expect("items", "not_null", gxe.ExpectColumnValuesToNotBeNull(column="category"))
        # structure, not an alphabet: levels split by "/" (the normalised key, data/taxonomy.py)
        cats = pd.DataFrame({"category": as_str(t.items["category"])})
        levels = cats["category"].str.split(KEY_SEPARATOR, regex=False)
        cats["depth"] = levels.map(len, na_action="ignore").astype("Int64")
        cats["empty_levels"] = levels.map(lambda ls: sum(not lv.strip() for lv in ls),
                                          na_action="ignore").astype("Int64")
        if "item_id" in t.items.columns:
            cats.insert(0, "item_id", t.items["item_id"])
        p.frame("categories", cats, ["item_id"])
        p.expect("categories", "no_empty_level",
                 gxe.ExpectColumnValuesToBeBetween(column="empty_levels", min_value=0, max_value=0))
        p.expect("categories", "depth",
                 gxe.ExpectColumnValuesToBeBetween(column="depth", min_value=1,
                                                   max_value=cfg.category_max_depth))
        if cfg.category_pattern is not None:
            p.expect("categories", "pattern",
                     gxe.ExpectColumnValuesToMatchRegex(column="category", regex=cfg.category_pattern))
        # the malformed rows in pandas too: GX counts per expectation, the outcome needs the union
        bad = (cats["empty_levels"].fillna(0) > 0) | (cats["depth"].fillna(1) > cfg.category_max_depth)
        if cfg.category_pattern is not None:
            rx = re.compile(cfg.category_pattern)
            bad |= cats["category"].map(lambda c: rx.search(c) is None, na_action="ignore") \
                .fillna(False).astype(bool)
        return {"missing": [], "bad_values": sorted(set(cats.loc[bad, "category"].dropna())),
                "bad_rows": int(bad.sum())}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        items = t.items
        if facts["missing"]:
            return not_checked("items", facts["missing"])
        if items.empty:
            return empty("items")
        n_null = res["not_null"].unexpected_count or 0
        n_bad = facts["bad_rows"]
        bad_values = facts["bad_values"][:MAX_EXAMPLES]
        rule = f"a non-empty path of at most {cfg.category_max_depth} non-empty levels"
        if cfg.category_pattern is not None:
            rule += f" matching {cfg.category_pattern!r}"
        structural = [r for label, r in res.items() if label != "not_null"]
        meta = {"rows": len(items), "rule": rule, "pattern": cfg.category_pattern,
                "max_depth": cfg.category_max_depth, "null_count": n_null,
                "empty_level_count": res["no_empty_level"].unexpected_count or 0,
                "too_deep_count": res["depth"].unexpected_count or 0,
                "mismatch_count": n_bad, "mismatch_examples": bad_values,
                "example_item_ids": sorted({e.get("item_id") for r in structural
                                            for e in r.index_examples
                                            if isinstance(e, dict)} - {None})[:MAX_EXAMPLES],
                **gx_meta(res)}
        if all(r.success for r in res.values()):
            return True, f"all {len(items)} categories are {rule}", meta
        desc = (f"{n_null + n_bad} of {len(items)} categories null or not {rule} ({n_null} null, "
                f"{n_bad} malformed")
        desc += f", e.g. {quote_list(bad_values)})" if bad_values else ")"
        return failed(desc, res, meta)


class ItemsQuarantine(Rule):
    name = "items_quarantine"
    severity = "error"
    description = ("the share of item rows quarantined at ingest is at most "
                   "validation.item_quarantine_max_share")

    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        iq = t.item_quarantine
        reasons = (as_str(iq["reason"]) if "reason" in iq.columns
                   else pd.Series(pd.NA, index=iq.index, dtype=pd.StringDtype())).fillna("(no reason)")
        rows = pd.DataFrame({"accepted": [True] * len(t.items) + [False] * len(iq)})
        p.frame("item_rows", rows)
        p.expect("item_rows", "accepted",
                 p.gxe.ExpectColumnValuesToBeInSet(column="accepted", value_set=[True],
                                                   mostly=1.0 - cfg.item_quarantine_max_share))
        classes = reasons.map(reason_class)
        return {
            "kept": len(t.items), "quarantined": len(iq),
            "reason_counts": {str(k): int(v) for k, v in classes.value_counts().items()},
            "rules": ({str(k): str(v) for k, v in zip(classes, iq["rule"])}
                      if "rule" in iq.columns else {}),
            "examples": [{c: jsonable(r.get(c)) for c in ("item_id", "row", "reason") if c in r}
                         for r in iq.head(MAX_EXAMPLES).to_dict("records")],
            "titles_truncated": int(t.meta.get("titles_truncated", 0) or 0),
            "title_max_chars": int(t.meta.get("title_max_chars") or cfg.title_max_chars)}

    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        r = res["accepted"]
        kept, quarantined = facts["kept"], facts["quarantined"]
        total = kept + quarantined
        share = quarantined / total if total else 0.0
        reasons = facts["reason_counts"]
        meta = {"rows": total, "kept": kept, "quarantined": quarantined, "share": share,
                "max_share": cfg.item_quarantine_max_share, "reason_counts": reasons,
                "rules": facts["rules"], "examples": facts["examples"],
                "titles_truncated": facts["titles_truncated"],
                "title_max_chars": facts["title_max_chars"], **gx_meta(res)}
        truncated = (f"; {facts['titles_truncated']} title(s) cut to {facts['title_max_chars']} "
                     f"characters" if facts["titles_truncated"] else "")
        if total == 0:
            return False, "items table is empty (0 rows): nothing to validate", meta
        cmp = "<=" if r.success else ">"
        desc = (f"{quarantined} of {total} item rows quarantined ({pct(share)} {cmp} "
                f"{pct(cfg.item_quarantine_max_share)} allowed)")
        if reasons:
            desc += ": " + ", ".join(
                f"{n} {reason}" + (f" [{facts['rules'][reason]}]" if reason in facts["rules"] else "")
                for reason, n in list(reasons.items())[:6])
        if r.exception:
            desc += f"; GX error {r.exception}"
        return r.success, desc + truncated, meta


ITEM_RULES: list[Rule] = [ItemsSchema(), UniqueItemId(), TitlesNonEmpty(), CategoryFormat(),
                          ItemsQuarantine()]
