"""Catalog validation rules, run with Great Expectations 1.x (ephemeral context, pandas batches).

`validate_tables(items, images, params)` returns one `CheckOutcome` per name in `CHECK_NAMES`, in
that order. The Dagster orchestration turns each outcome into an asset check; `validated_catalog`
refuses to run while `failed_errors(outcomes)` is not empty. Severity "warn" outcomes are reported
only.

Bad data never raises: a missing column, an empty table or a wrong dtype becomes a failed outcome
whose description names the problem. Only programming errors raise (wrong argument types, a params
dict without the validation / ingest keys, an invalid category regex).

Item rows that break a rule at ingest (data/ingest.py screen_items: missing title, empty or
malformed category path, duplicate item_id, unknown split) are quarantined there with their reason,
like bad images; `items_quarantine` fails only when their share passes
validation.item_quarantine_max_share (default: quarantine_max_share). The other item rules then
check what was kept (and still catch a table that was never screened).

How the rules map onto GX: every rule is a handful of expectations on one of a few frames (the two
tables, and small frames derived from them with pandas: stripped titles, ok-image dimensions,
per-item image counts, sha256 owners, item-id membership). All frames are validated in one
ephemeral context per call; pass/fail comes from GX, the wording and the examples are built here.
Membership of images.item_id in items.item_id is precomputed as a boolean column and checked with
ExpectColumnValuesToBeInSet([True]): passing an 8,000-id value_set to GX costs about a second of
pydantic serialization per call (and grows with the catalog), the boolean column costs nothing.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from data.schema import CATALOG_VIEW, IMAGE_COLUMNS, ITEM_COLUMNS, SPLITS, STATUS_OK, \
    STATUS_QUARANTINED, reason_class
from data.taxonomy import KEY_SEPARATOR

CHECK_NAMES: tuple[str, ...] = (
    "items_schema",
    "unique_item_id",
    "titles_non_empty",
    "category_format",
    "items_quarantine",
    "images_schema",
    "images_decode",
    "image_dimensions",
    "items_have_images",
    "duplicate_images",
)
SEVERITY: dict[str, str] = {name: "error" for name in CHECK_NAMES} | {"duplicate_images": "warn"}

MAX_EXAMPLES = 10
# dtype names GX's ExpectColumnValuesToBeInTypeList accepts for pandas: "StringDtype" matches the
# pandas string extension dtype (string-like columns are cast to pd.StringDtype() first, whatever
# their storage), "object" + "str" matches object columns whose non-null values are all str.
STRING_TYPES = ["StringDtype", "object", "str"]
INT_TYPES = ["Int64Dtype", "Int32Dtype", "Int16Dtype", "Int8Dtype",
             "UInt64Dtype", "UInt32Dtype", "UInt16Dtype", "UInt8Dtype",
             "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"]


@dataclass
class CheckOutcome:
    name: str            # stable snake_case id, used as the Dagster asset-check name
    passed: bool
    severity: str        # "error" (blocks downstream) or "warn" (reported only)
    description: str     # one line, human readable: what was checked and the result
    metadata: dict = field(default_factory=dict)   # JSON-able


def failed_errors(outcomes: Iterable[CheckOutcome]) -> list[CheckOutcome]:
    """The failed error-severity outcomes (what blocks `validated_catalog`)."""
    return [o for o in outcomes if not o.passed and o.severity == "error"]


def validate_catalog(catalog, params: dict) -> list[CheckOutcome]:
    """`validate_tables` on a loaded `data.schema.Catalog` (with its quarantined item rows)."""
    return validate_tables(catalog.items, catalog.images, params,
                           item_quarantine=getattr(catalog, "item_quarantine", None),
                           meta=getattr(catalog, "meta", None))


# ---------------------------------------------------------------------------------------------
# configuration and small helpers

@dataclass(frozen=True)
class _Config:
    quarantine_max_share: float
    title_min_chars: int
    category_pattern: str | None   # optional extra regex on the normalised path (null: structure only)
    max_side: int
    min_side: int
    max_pixels: int
    max_aspect: float
    item_quarantine_max_share: float = 0.02
    title_max_chars: int = 500
    category_max_depth: int = 8

    @classmethod
    def from_params(cls, params: dict) -> "_Config":
        try:
            v, ing = params["validation"], params["ingest"]
            share = float(v["quarantine_max_share"])
            item_share = v.get("item_quarantine_max_share")
            cfg = cls(quarantine_max_share=share,
                      title_min_chars=int(v["title_min_chars"]),
                      category_pattern=(str(v["category_pattern"]) if v.get("category_pattern")
                                        else None),
                      max_side=int(ing["max_side"]), min_side=int(ing["min_side"]),
                      max_pixels=int(ing["max_pixels"]), max_aspect=float(ing["max_aspect"]),
                      item_quarantine_max_share=share if item_share is None else float(item_share),
                      title_max_chars=int(v.get("title_max_chars") or 500),
                      category_max_depth=int(v.get("category_max_depth") or 8))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"params need validation.{{quarantine_max_share, title_min_chars}} and "
                             f"ingest.{{max_side, min_side, max_pixels, max_aspect}}: {exc!r}") from exc
        for name in ("quarantine_max_share", "item_quarantine_max_share"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"validation.{name} must be in [0, 1], got {getattr(cfg, name)}")
        if cfg.category_max_depth < 1:
            raise ValueError(f"validation.category_max_depth must be >= 1, got {cfg.category_max_depth}")
        if cfg.category_pattern is not None:
            try:
                re.compile(cfg.category_pattern)
            except re.error as exc:
                raise ValueError(f"validation.category_pattern is not a valid regex: {exc}") from exc
        return cfg

    @property
    def mostly(self) -> float:
        return 1.0 - self.quarantine_max_share


def _jsonable(x: Any) -> Any:
    """numpy / pandas scalars, NA and nested containers -> plain JSON types."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else (None if math.isnan(x) else str(x))
    if x is None or isinstance(x, (bool, int, str)):
        return x
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    return str(x)


def _tidy_number(v: Any) -> Any:
    """500.0 -> 500 (dimension frames are float so that nulls survive); other values unchanged."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _pct(share: float) -> str:
    return f"{100.0 * share:.1f}%"


def _quote_list(values: Iterable[Any], limit: int = 3) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _is_string_like(dtype) -> bool:
    if isinstance(dtype, pd.StringDtype):
        return True
    if isinstance(dtype, pd.ArrowDtype):
        import pyarrow as pa
        return pa.types.is_string(dtype.pyarrow_dtype) or pa.types.is_large_string(dtype.pyarrow_dtype)
    return False


def _normalize(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A copy GX can type-check: first of duplicated columns kept, string-like dtypes -> StringDtype()."""
    dupes = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
    out = df.loc[:, ~df.columns.duplicated()].copy()
    out.columns = [str(c) for c in out.columns]
    for col in out.columns:
        dtype = out[col].dtype
        if _is_string_like(dtype) and dtype != pd.StringDtype():
            out[col] = out[col].astype(pd.StringDtype())
        elif isinstance(dtype, pd.ArrowDtype) and pd.api.types.is_integer_dtype(dtype):
            out[col] = out[col].astype("Int64")
    return out.reset_index(drop=True), dupes


def _as_str(series: pd.Series) -> pd.Series:
    return series.astype(pd.StringDtype())


def _equals(series: pd.Series, value: str) -> pd.Series:
    """Elementwise series == value as plain bool (null -> False)."""
    return (_as_str(series) == value).fillna(False).astype(bool)


def _as_float(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").astype("Float64").to_numpy(dtype="float64",
                                                                              na_value=np.nan)


# ---------------------------------------------------------------------------------------------
# GX plumbing: frames with their expectations, validated in one ephemeral context

@dataclass
class _Result:
    success: bool
    element_count: int | None = None
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    examples: list = field(default_factory=list)        # unexpected values
    index_examples: list = field(default_factory=list)  # {key column: value, ...} of unexpected rows
    observed: Any = None
    exception: str | None = None

    def summary(self) -> dict:
        out = {"success": self.success, "element_count": self.element_count,
               "unexpected_count": self.unexpected_count,
               "unexpected_percent": self.unexpected_percent}
        if self.examples:
            out["unexpected_examples"] = self.examples
        if self.observed is not None:
            out["observed_value"] = self.observed
        if self.exception:
            out["exception"] = self.exception
        return {k: v for k, v in out.items() if v is not None}


class _Plan:
    """Expectations grouped by frame; each one tagged with (check name, label)."""

    def __init__(self) -> None:
        self.frames: dict[str, tuple[pd.DataFrame, list[str]]] = {}
        self.expectations: dict[str, list[tuple[str, str, Any]]] = {}

    def frame(self, name: str, df: pd.DataFrame, key_columns: Iterable[str] = ()) -> None:
        keys = [c for c in key_columns if c in df.columns]
        self.frames[name] = (df, keys)
        self.expectations.setdefault(name, [])

    def expect(self, frame: str, check: str, label: str, expectation) -> None:
        self.expectations[frame].append((check, label, expectation))

    def run(self) -> dict[tuple[str, str], _Result]:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas("pailitao_catalog")
        results: dict[tuple[str, str], _Result] = {}
        for name, (df, keys) in self.frames.items():
            planned = self.expectations[name]
            if not planned:
                continue
            suite = gx.ExpectationSuite(name=f"pailitao_{name}")
            for check, label, exp in planned:
                exp.meta = {"check": check, "label": label}
                before = len(suite.expectations)
                suite.add_expectation(exp)
                if len(suite.expectations) != before + 1:   # GX drops "equalish" duplicates
                    raise RuntimeError(f"duplicate expectation for {check}/{label} on {name}")
            batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            batch = batch_def.get_batch(batch_parameters={"dataframe": df})
            result_format: dict = {"result_format": "SUMMARY",
                                   "partial_unexpected_count": MAX_EXAMPLES}
            if keys:
                result_format["unexpected_index_column_names"] = keys
            with warnings.catch_warnings():
                # GX matches regexes with str.contains; pandas warns when the pattern has groups
                warnings.filterwarnings("ignore", message="This pattern is interpreted as a "
                                        "regular expression", category=UserWarning)
                validation = batch.validate(suite, result_format=result_format)
            for evr in validation.results:
                meta = evr.expectation_config.meta or {}
                results[(meta["check"], meta["label"])] = _to_result(evr)
        missing = [(c, lb) for exps in self.expectations.values() for c, lb, _ in exps
                   if (c, lb) not in results]
        if missing:
            raise RuntimeError(f"GX returned no result for {missing}")
        return results


def _to_result(evr) -> _Result:
    res = dict(evr.result or {})
    info = evr.exception_info or {}
    raised = bool(info.get("raised_exception")) if isinstance(info, dict) else False
    exception = (info.get("exception_message") or "exception") if raised else None
    return _Result(
        success=bool(evr.success) and not raised,
        element_count=_jsonable(res.get("element_count")),
        unexpected_count=_jsonable(res.get("unexpected_count")),
        unexpected_percent=_jsonable(res.get("unexpected_percent")),
        examples=_jsonable(list(res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]),
        index_examples=_jsonable(list(res.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]),
        observed=_jsonable(res.get("observed_value")),
        exception=exception)


# ---------------------------------------------------------------------------------------------
# the rules

def validate_tables(items: pd.DataFrame, images: pd.DataFrame, params: dict,
                    item_quarantine: pd.DataFrame | None = None,
                    meta: dict | None = None) -> list[CheckOutcome]:
    """Run every check in CHECK_NAMES on the two catalog tables; never raises for bad data.
    item_quarantine: the item rows quarantined at ingest (item_id, row, reason, rule); meta: the
    catalog's meta.json (its titles_truncated count is reported)."""
    if not isinstance(items, pd.DataFrame) or not isinstance(images, pd.DataFrame):
        raise TypeError("validate_tables expects two pandas DataFrames (items, images), got "
                        f"{type(items).__name__}, {type(images).__name__}")
    import great_expectations.expectations as gxe

    cfg = _Config.from_params(params)
    items, item_dupe_cols = _normalize(items)
    images, image_dupe_cols = _normalize(images)
    plan = _Plan()
    plan.frame("items", items, ["item_id"])
    plan.frame("images", images, ["image_id", "item_id"])
    pre: dict[str, dict] = {}   # per check: what was not checked and pandas-side facts

    # 1 items_schema ---------------------------------------------------------------------------
    plan.expect("items", "items_schema", "rows", gxe.ExpectTableRowCountToBeBetween(min_value=1))
    for col in ITEM_COLUMNS:
        plan.expect("items", "items_schema", f"exists:{col}", gxe.ExpectColumnToExist(column=col))
        if col in items.columns:
            plan.expect("items", "items_schema", f"type:{col}",
                        gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=STRING_TYPES))
    if "split" in items.columns:
        plan.expect("items", "items_schema", "split_values",
                    gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))

    # 2 unique_item_id ---------------------------------------------------------------------------
    pre["unique_item_id"] = {"missing": [c for c in ["item_id"] if c not in items.columns]}
    if "item_id" in items.columns:
        plan.expect("items", "unique_item_id", "not_null",
                    gxe.ExpectColumnValuesToNotBeNull(column="item_id"))
        plan.expect("items", "unique_item_id", "unique",
                    gxe.ExpectColumnValuesToBeUnique(column="item_id"))

    # 3 titles_non_empty --------------------------------------------------------------------------
    pre["titles_non_empty"] = {"missing": [c for c in ["title"] if c not in items.columns]}
    if "title" in items.columns:
        titles = pd.DataFrame({"title": _as_str(items["title"])})
        titles["title_stripped"] = titles["title"].str.strip()
        if "item_id" in items.columns:
            titles.insert(0, "item_id", items["item_id"])
        plan.frame("titles", titles, ["item_id"])
        plan.expect("titles", "titles_non_empty", "not_null",
                    gxe.ExpectColumnValuesToNotBeNull(column="title"))
        plan.expect("titles", "titles_non_empty", "min_chars",
                    gxe.ExpectColumnValueLengthsToBeBetween(column="title_stripped",
                                                            min_value=cfg.title_min_chars))

    # 4 category_format ---------------------------------------------------------------------------
    pre["category_format"] = {"missing": [c for c in ["category"] if c not in items.columns]}
    if "category" in items.columns:
        plan.expect("items", "category_format", "not_null",
                    gxe.ExpectColumnValuesToNotBeNull(column="category"))
        # structure, not an alphabet: levels split by "/" (the normalised key, data/taxonomy.py)
        cats = pd.DataFrame({"category": _as_str(items["category"])})
        levels = cats["category"].str.split(KEY_SEPARATOR, regex=False)
        cats["depth"] = levels.map(len, na_action="ignore").astype("Int64")
        cats["empty_levels"] = levels.map(lambda ls: sum(not lv.strip() for lv in ls),
                                          na_action="ignore").astype("Int64")
        if "item_id" in items.columns:
            cats.insert(0, "item_id", items["item_id"])
        plan.frame("categories", cats, ["item_id"])
        plan.expect("categories", "category_format", "no_empty_level",
                    gxe.ExpectColumnValuesToBeBetween(column="empty_levels", min_value=0, max_value=0))
        plan.expect("categories", "category_format", "depth",
                    gxe.ExpectColumnValuesToBeBetween(column="depth", min_value=1,
                                                      max_value=cfg.category_max_depth))
        if cfg.category_pattern is not None:
            plan.expect("categories", "category_format", "pattern",
                        gxe.ExpectColumnValuesToMatchRegex(column="category",
                                                           regex=cfg.category_pattern))
        bad = (cats["empty_levels"].fillna(0) > 0) | (cats["depth"].fillna(1) > cfg.category_max_depth)
        if cfg.category_pattern is not None:
            rx = re.compile(cfg.category_pattern)
            bad |= cats["category"].map(lambda c: rx.search(c) is None, na_action="ignore") \
                .fillna(False).astype(bool)
        pre["category_format"]["bad_values"] = sorted(set(cats.loc[bad, "category"].dropna()))
        pre["category_format"]["bad_rows"] = int(bad.sum())

    # 5 items_quarantine --------------------------------------------------------------------------
    # item rows quarantined at ingest beside the kept ones: fails above the allowed share
    iq = item_quarantine if item_quarantine is not None else pd.DataFrame(columns=["item_id", "reason"])
    iq_reasons = (_as_str(iq["reason"]) if "reason" in iq.columns
                  else pd.Series(pd.NA, index=iq.index, dtype=pd.StringDtype())).fillna("(no reason)")
    rows = pd.DataFrame({"accepted": [True] * len(items) + [False] * len(iq)})
    plan.frame("item_rows", rows)
    plan.expect("item_rows", "items_quarantine", "accepted",
                gxe.ExpectColumnValuesToBeInSet(column="accepted", value_set=[True],
                                                mostly=1.0 - cfg.item_quarantine_max_share))
    pre["items_quarantine"] = {
        "kept": len(items), "quarantined": len(iq),
        "reason_counts": {str(k): int(v) for k, v in iq_reasons.map(reason_class).value_counts().items()},
        "rules": ({str(k): str(v) for k, v in zip(iq_reasons.map(reason_class), iq["rule"])}
                  if "rule" in iq.columns else {}),
        "examples": [{c: _jsonable(r.get(c)) for c in ("item_id", "row", "reason") if c in r}
                     for r in iq.head(MAX_EXAMPLES).to_dict("records")],
        "titles_truncated": int((meta or {}).get("titles_truncated", 0) or 0),
        "title_max_chars": int((meta or {}).get("title_max_chars") or cfg.title_max_chars)}

    # 6 images_schema -----------------------------------------------------------------------------
    plan.expect("images", "images_schema", "rows", gxe.ExpectTableRowCountToBeBetween(min_value=1))
    for col, dtype in IMAGE_COLUMNS.items():
        plan.expect("images", "images_schema", f"exists:{col}", gxe.ExpectColumnToExist(column=col))
        if col in images.columns:
            types = INT_TYPES if dtype.lower().startswith(("int", "uint")) else STRING_TYPES
            plan.expect("images", "images_schema", f"type:{col}",
                        gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=types))
    pre["images_schema"] = {"not_checked": []}
    if "image_id" in images.columns:
        plan.expect("images", "images_schema", "image_id_not_null",
                    gxe.ExpectColumnValuesToNotBeNull(column="image_id"))
        plan.expect("images", "images_schema", "image_id_unique",
                    gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    if "status" in images.columns:
        plan.expect("images", "images_schema", "status_not_null",
                    gxe.ExpectColumnValuesToNotBeNull(column="status"))
        plan.expect("images", "images_schema", "status_values",
                    gxe.ExpectColumnValuesToBeInSet(column="status",
                                                    value_set=[STATUS_OK, STATUS_QUARANTINED]))
    if "item_id" in images.columns and "item_id" in items.columns:
        known_ids = set(_as_str(items["item_id"]).dropna())
        image_items = _as_str(images["item_id"])
        refs = pd.DataFrame({"item_id": image_items,
                             "item_known": image_items.isin(known_ids) & image_items.notna()})
        if "image_id" in images.columns:
            refs.insert(0, "image_id", images["image_id"])
        plan.frame("image_refs", refs, ["image_id", "item_id"])
        plan.expect("image_refs", "images_schema", "item_id_known",
                    gxe.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True]))
    elif "item_id" in images.columns:
        pre["images_schema"]["not_checked"].append("images.item_id in items.item_id "
                                                   "(items has no item_id column)")

    # 7 images_decode -----------------------------------------------------------------------------
    pre["images_decode"] = {"missing": [c for c in ["status"] if c not in images.columns]}
    if "status" in images.columns:
        decode = pd.DataFrame({"status": _as_str(images["status"]).fillna("<null>")})
        if "image_id" in images.columns:
            decode.insert(0, "image_id", images["image_id"])
        plan.frame("decode", decode, ["image_id"])
        plan.expect("decode", "images_decode", "status_ok",
                    gxe.ExpectColumnValuesToBeInSet(column="status", value_set=[STATUS_OK],
                                                    mostly=cfg.mostly))
        not_ok = decode["status"] != STATUS_OK
        reasons = (_as_str(images["reason"]) if "reason" in images.columns
                   else pd.Series(pd.NA, index=images.index, dtype=pd.StringDtype()))
        reasons = reasons[not_ok].fillna("(no reason)")
        pre["images_decode"]["reason_counts"] = {str(k): int(v) for k, v in
                                                 reasons.value_counts().items()}
        ids = (images["image_id"] if "image_id" in images.columns
               else pd.Series(images.index.astype(str), index=images.index))
        pre["images_decode"]["examples"] = [
            {"image_id": _jsonable(i), "reason": r}
            for i, r in zip(ids[not_ok].head(MAX_EXAMPLES), reasons.head(MAX_EXAMPLES))]

    # 8 image_dimensions --------------------------------------------------------------------------
    dim_cols = ["status", "width", "height", "orig_width", "orig_height"]
    pre["image_dimensions"] = {"missing": [c for c in dim_cols if c not in images.columns]}
    if not pre["image_dimensions"]["missing"]:
        ok = images[_equals(images["status"], STATUS_OK)]
        dims = pd.DataFrame({c: _as_float(ok[c]) for c in dim_cols[1:]})
        lo = np.fmin(dims["orig_width"], dims["orig_height"])
        hi = np.fmax(dims["orig_width"], dims["orig_height"])
        with np.errstate(divide="ignore", invalid="ignore"):
            dims["orig_pixels"] = dims["orig_width"] * dims["orig_height"]
            dims["orig_aspect"] = np.where(lo > 0, hi / lo, np.where(hi > 0, np.inf, np.nan))
        if "image_id" in ok.columns:
            dims.insert(0, "image_id", ok["image_id"].to_numpy())
        plan.frame("ok_dims", dims, ["image_id"])
        pre["image_dimensions"]["ok_images"] = len(dims)
        for col in dim_cols[1:]:
            plan.expect("ok_dims", "image_dimensions", f"{col} not null",
                        gxe.ExpectColumnValuesToNotBeNull(column=col))
        for col in ("width", "height"):
            plan.expect("ok_dims", "image_dimensions", f"{col} in [1, {cfg.max_side}]",
                        gxe.ExpectColumnValuesToBeBetween(column=col, min_value=1,
                                                          max_value=cfg.max_side))
        for col in ("orig_width", "orig_height"):
            plan.expect("ok_dims", "image_dimensions", f"{col} >= {cfg.min_side}",
                        gxe.ExpectColumnValuesToBeBetween(column=col, min_value=cfg.min_side))
        plan.expect("ok_dims", "image_dimensions", f"orig_width*orig_height <= {cfg.max_pixels}",
                    gxe.ExpectColumnValuesToBeBetween(column="orig_pixels",
                                                      max_value=cfg.max_pixels))
        plan.expect("ok_dims", "image_dimensions", f"orig aspect <= {cfg.max_aspect:g}",
                    gxe.ExpectColumnValuesToBeBetween(column="orig_aspect",
                                                      max_value=cfg.max_aspect))

    # 9 items_have_images -------------------------------------------------------------------------
    cov_missing = ([f"items.{c}" for c in ["item_id"] if c not in items.columns]
                   + [f"images.{c}" for c in ["item_id", "status", "view"]
                      if c not in images.columns])
    pre["items_have_images"] = {"missing": cov_missing}
    if not cov_missing:
        usable = _equals(images["status"], STATUS_OK) & _equals(images["view"], CATALOG_VIEW)
        counts = _as_str(images["item_id"])[usable].value_counts()
        item_ids = _as_str(items["item_id"])
        coverage = pd.DataFrame({"item_id": item_ids,
                                 "ok_catalog_images": item_ids.map(counts).fillna(0).astype("int64")})
        plan.frame("coverage", coverage, ["item_id"])
        plan.expect("coverage", "items_have_images", "has_ok_catalog_image",
                    gxe.ExpectColumnValuesToBeBetween(column="ok_catalog_images", min_value=1,
                                                      mostly=cfg.mostly))

    # 10 duplicate_images --------------------------------------------------------------------------
    dup_missing = [c for c in ["sha256", "item_id", "status"] if c not in images.columns]
    pre["duplicate_images"] = {"missing": dup_missing}
    if not dup_missing:
        ok = images[_equals(images["status"], STATUS_OK)]
        owners = (pd.DataFrame({"sha256": _as_str(ok["sha256"]), "item_id": _as_str(ok["item_id"])})
                  .dropna(subset=["sha256"]).drop_duplicates().reset_index(drop=True))
        plan.frame("sha_owners", owners, ["item_id"])
        plan.expect("sha_owners", "duplicate_images", "sha256_unique_across_items",
                    gxe.ExpectColumnValuesToBeUnique(column="sha256"))
        shared = owners[owners["sha256"].duplicated(keep=False)]
        groups = shared.groupby("sha256", sort=True)["item_id"].agg(list)
        pre["duplicate_images"].update(
            ok_images=len(ok), groups=len(groups),
            items_involved=len({i for ids in groups for i in ids}),
            examples=[{"sha256": sha[:12], "item_ids": sorted(str(i) for i in ids)[:5],
                       "n_items": len(ids)}
                      for sha, ids in groups.head(MAX_EXAMPLES).items()])

    results = plan.run()

    def of(check: str) -> dict[str, _Result]:
        return {label: r for (c, label), r in results.items() if c == check}

    builders = {
        "items_schema": lambda: _items_schema(of("items_schema"), items, item_dupe_cols),
        "unique_item_id": lambda: _unique_item_id(of("unique_item_id"), items, pre["unique_item_id"]),
        "titles_non_empty": lambda: _titles(of("titles_non_empty"), items, cfg, pre["titles_non_empty"]),
        "category_format": lambda: _category(of("category_format"), items, cfg, pre["category_format"]),
        "items_quarantine": lambda: _items_quarantine(of("items_quarantine"), cfg, pre["items_quarantine"]),
        "images_schema": lambda: _images_schema(of("images_schema"), images, image_dupe_cols,
                                                pre["images_schema"]),
        "images_decode": lambda: _images_decode(of("images_decode"), images, cfg, pre["images_decode"]),
        "image_dimensions": lambda: _image_dimensions(of("image_dimensions"), images,
                                                      pre["image_dimensions"]),
        "items_have_images": lambda: _items_have_images(of("items_have_images"), items, images, cfg,
                                                        pre["items_have_images"]),
        "duplicate_images": lambda: _duplicate_images(of("duplicate_images"), images,
                                                      pre["duplicate_images"]),
    }
    outcomes = []
    for name in CHECK_NAMES:
        passed, description, metadata = builders[name]()
        outcomes.append(CheckOutcome(name=name, passed=bool(passed), severity=SEVERITY[name],
                                     description=description, metadata=_jsonable(metadata)))
    return outcomes


# ---------------------------------------------------------------------------------------------
# outcome builders: (passed, description, metadata); pass/fail comes from the GX results

def _gx_meta(results: dict[str, _Result]) -> dict:
    return {"expectations": {label: r.summary() for label, r in results.items()}}


def _not_checked(table: str, missing: list[str], extra: dict | None = None):
    cols = ", ".join(repr(c) for c in missing)
    return (False, f"not checked: {table} column(s) {cols} missing",
            {"missing_columns": missing, **(extra or {})})


def _empty(table: str, extra: dict | None = None):
    return False, f"{table} table is empty (0 rows): nothing to validate", {"rows": 0, **(extra or {})}


def _exception_notes(results: dict[str, _Result]) -> list[str]:
    return [f"{label}: GX error {r.exception}" for label, r in results.items() if r.exception]


def _items_schema(res, items, dupe_cols):
    missing = [c for c in ITEM_COLUMNS if not res[f"exists:{c}"].success]
    bad_types = {c: res[f"type:{c}"].observed or "non-string values"
                 for c in ITEM_COLUMNS if f"type:{c}" in res and not res[f"type:{c}"].success}
    meta = {"rows": len(items), "columns": list(items.columns), "missing_columns": missing,
            "bad_dtypes": bad_types, "duplicate_columns": dupe_cols, **_gx_meta(res)}
    problems = []
    if not res["rows"].success:
        problems.append("table is empty (0 rows)")
    if missing:
        problems.append("missing column(s) " + ", ".join(repr(c) for c in missing))
    for col, observed in bad_types.items():
        examples = res[f"type:{col}"].examples
        problems.append(f"column {col!r} is not string-typed (observed {observed}"
                        + (f", e.g. {_quote_list(examples)})" if examples else ")"))
    if dupe_cols:
        problems.append("duplicated column name(s) " + ", ".join(repr(c) for c in dupe_cols))
    split = res.get("split_values")
    if split is not None and not split.success:
        meta["bad_split_count"] = split.unexpected_count
        meta["bad_split_examples"] = sorted(set(map(str, split.examples)))
        problems.append(f"{split.unexpected_count} split value(s) not in {list(SPLITS)} "
                        f"(e.g. {_quote_list(meta['bad_split_examples'])})")
    problems += _exception_notes({k: v for k, v in res.items() if not k.startswith("type:")})
    if problems:
        return False, "items schema: " + "; ".join(problems), meta
    return (True, f"items: {len(items)} rows, columns {', '.join(ITEM_COLUMNS)} present and "
                  f"string-typed, split values in {{{', '.join(SPLITS)}}}", meta)


def _unique_item_id(res, items, pre):
    if pre["missing"]:
        return _not_checked("items", pre["missing"])
    if items.empty:
        return _empty("items")
    nulls, unique = res["not_null"], res["unique"]
    ids = _as_str(items["item_id"]).dropna()
    counts = ids.value_counts()
    dup = counts[counts > 1]
    meta = {"rows": len(items), "null_count": int(items["item_id"].isna().sum()),
            "duplicated_ids": len(dup), "duplicated_rows": int(dup.sum()),
            "duplicate_examples": [{"item_id": k, "count": int(v)}
                                   for k, v in dup.head(MAX_EXAMPLES).items()], **_gx_meta(res)}
    if nulls.success and unique.success:
        return True, f"all {len(items)} item_ids are non-null and unique", meta
    problems = []
    if not nulls.success:
        problems.append(f"{meta['null_count']} null item_id(s)")
    if not unique.success:
        problems.append(f"{len(dup)} item_id(s) duplicated over {int(dup.sum())} rows "
                        f"(e.g. {_quote_list(list(dup.index))})")
    problems += _exception_notes(res)
    return False, f"item_id of {len(items)} items: " + "; ".join(problems), meta


def _titles(res, items, cfg, pre):
    if pre["missing"]:
        return _not_checked("items", pre["missing"])
    if items.empty:
        return _empty("items")
    nulls, short = res["not_null"], res["min_chars"]
    n_null, n_short = nulls.unexpected_count or 0, short.unexpected_count or 0
    examples = [e.get("item_id") for e in nulls.index_examples + short.index_examples
                if isinstance(e, dict)][:MAX_EXAMPLES]
    meta = {"rows": len(items), "min_chars": cfg.title_min_chars, "null_count": n_null,
            "too_short_count": n_short, "example_item_ids": examples,
            "too_short_examples": short.examples, **_gx_meta(res)}
    if nulls.success and short.success:
        return (True, f"all {len(items)} titles have at least {cfg.title_min_chars} "
                      f"non-blank character(s)", meta)
    bad = n_null + n_short
    desc = (f"{bad} of {len(items)} titles empty or shorter than {cfg.title_min_chars} char(s) "
            f"after stripping whitespace ({n_null} null, {n_short} blank/short)")
    if examples:
        desc += f", e.g. item_id {_quote_list(examples)}"
    notes = _exception_notes(res)
    return False, desc + ("; " + "; ".join(notes) if notes else ""), meta


def _category(res, items, cfg, pre):
    if pre["missing"]:
        return _not_checked("items", pre["missing"])
    if items.empty:
        return _empty("items")
    nulls = res["not_null"]
    n_null = nulls.unexpected_count or 0
    n_bad = pre["bad_rows"]
    bad_values = pre["bad_values"][:MAX_EXAMPLES]
    rule = f"a non-empty path of at most {cfg.category_max_depth} non-empty levels"
    if cfg.category_pattern is not None:
        rule += f" matching {cfg.category_pattern!r}"
    structural = [r for label, r in res.items() if label != "not_null"]
    meta = {"rows": len(items), "rule": rule, "pattern": cfg.category_pattern,
            "max_depth": cfg.category_max_depth, "null_count": n_null,
            "empty_level_count": res["no_empty_level"].unexpected_count or 0,
            "too_deep_count": res["depth"].unexpected_count or 0,
            "mismatch_count": n_bad, "mismatch_examples": bad_values,
            "example_item_ids": sorted({e.get("item_id") for r in structural for e in r.index_examples
                                        if isinstance(e, dict)} - {None})[:MAX_EXAMPLES],
            **_gx_meta(res)}
    if all(r.success for r in res.values()):
        return True, f"all {len(items)} categories are {rule}", meta
    desc = (f"{n_null + n_bad} of {len(items)} categories null or not {rule} ({n_null} null, "
            f"{n_bad} malformed")
    desc += f", e.g. {_quote_list(bad_values)})" if bad_values else ")"
    notes = _exception_notes(res)
    return False, desc + ("; " + "; ".join(notes) if notes else ""), meta


def _items_quarantine(res, cfg, pre):
    r = res["accepted"]
    kept, quarantined = pre["kept"], pre["quarantined"]
    total = kept + quarantined
    share = quarantined / total if total else 0.0
    reasons = pre["reason_counts"]
    meta = {"rows": total, "kept": kept, "quarantined": quarantined, "share": share,
            "max_share": cfg.item_quarantine_max_share, "reason_counts": reasons,
            "rules": pre["rules"], "examples": pre["examples"],
            "titles_truncated": pre["titles_truncated"], "title_max_chars": pre["title_max_chars"],
            **_gx_meta(res)}
    truncated = (f"; {pre['titles_truncated']} title(s) cut to {pre['title_max_chars']} characters"
                 if pre["titles_truncated"] else "")
    if total == 0:
        return False, "items table is empty (0 rows): nothing to validate", meta
    cmp = "<=" if r.success else ">"
    desc = (f"{quarantined} of {total} item rows quarantined ({_pct(share)} {cmp} "
            f"{_pct(cfg.item_quarantine_max_share)} allowed)")
    if reasons:
        desc += ": " + ", ".join(f"{n} {reason}" + (f" [{pre['rules'][reason]}]" if reason in pre["rules"]
                                                    else "")
                                 for reason, n in list(reasons.items())[:6])
    if r.exception:
        desc += f"; GX error {r.exception}"
    return r.success, desc + truncated, meta


def _images_schema(res, images, dupe_cols, pre):
    missing = [c for c in IMAGE_COLUMNS if not res[f"exists:{c}"].success]
    bad_types = {c: res[f"type:{c}"].observed or "values of the wrong type"
                 for c in IMAGE_COLUMNS if f"type:{c}" in res and not res[f"type:{c}"].success}
    meta = {"rows": len(images), "missing_columns": missing, "bad_dtypes": bad_types,
            "duplicate_columns": dupe_cols, "not_checked": pre["not_checked"], **_gx_meta(res)}
    problems = []
    if not res["rows"].success:
        problems.append("table is empty (0 rows)")
    if missing:
        problems.append("missing column(s) " + ", ".join(repr(c) for c in missing))
    for col, observed in bad_types.items():
        want = IMAGE_COLUMNS[col]
        problems.append(f"column {col!r} is not {want}-typed (observed {observed})")
    if dupe_cols:
        problems.append("duplicated column name(s) " + ", ".join(repr(c) for c in dupe_cols))
    r = res.get("image_id_not_null")
    if r is not None and not r.success:
        problems.append(f"{r.unexpected_count} null image_id(s)")
    r = res.get("image_id_unique")
    if r is not None and not r.success:
        dup = sorted(set(map(str, r.examples)))
        meta["duplicate_image_id_examples"] = dup
        problems.append(f"{r.unexpected_count} rows share a duplicated image_id "
                        f"(e.g. {_quote_list(dup)})")
    r = res.get("status_not_null")
    if r is not None and not r.success:
        problems.append(f"{r.unexpected_count} null status value(s)")
    r = res.get("status_values")
    if r is not None and not r.success:
        vals = sorted(set(map(str, r.examples)))
        meta["bad_status_examples"] = vals
        problems.append(f"{r.unexpected_count} status value(s) not in "
                        f"{[STATUS_OK, STATUS_QUARANTINED]} (e.g. {_quote_list(vals)})")
    r = res.get("item_id_known")
    if r is not None and not r.success:
        unknown = sorted({str(e.get("item_id")) for e in r.index_examples if isinstance(e, dict)})
        meta["unknown_item_id_count"] = r.unexpected_count
        meta["unknown_item_id_examples"] = unknown
        meta["unknown_item_image_examples"] = r.index_examples
        problems.append(f"{r.unexpected_count} image(s) reference item_ids not in items "
                        f"(e.g. {_quote_list(unknown)})")
    if pre["not_checked"]:
        problems.append("not checked: " + "; ".join(pre["not_checked"]))
    problems += _exception_notes({k: v for k, v in res.items() if not k.startswith("type:")})
    if problems:
        return False, "images schema: " + "; ".join(problems), meta
    return (True, f"images: {len(images)} rows, all {len(IMAGE_COLUMNS)} columns present with "
                  f"expected dtypes, image_ids unique, every item_id is a known item", meta)


def _images_decode(res, images, cfg, pre):
    if pre["missing"]:
        return _not_checked("images", pre["missing"])
    if images.empty:
        return _empty("images", {"total": 0, "quarantined": 0})
    r = res["status_ok"]
    total = r.element_count or 0
    quarantined = r.unexpected_count or 0
    share = quarantined / total if total else 0.0
    reasons = pre["reason_counts"]
    meta = {"total": total, "quarantined": quarantined, "share": share,
            "max_share": cfg.quarantine_max_share, "unexpected_percent": r.unexpected_percent,
            "reason_counts": reasons, "examples": pre["examples"], **_gx_meta(res)}
    by_reason = ", ".join(f"{n} {reason}" for reason, n in list(reasons.items())[:5])
    if len(reasons) > 5:
        by_reason += ", ..."
    cmp = "<=" if r.success else ">"
    desc = (f"{quarantined} of {total} images quarantined ({_pct(share)} {cmp} "
            f"{_pct(cfg.quarantine_max_share)} allowed)")
    if by_reason:
        desc += f": {by_reason}"
    if r.exception:
        desc += f"; GX error {r.exception}"
    return r.success, desc, meta


def _image_dimensions(res, images, pre):
    if pre["missing"]:
        return _not_checked("images", pre["missing"])
    if images.empty:
        return _empty("images")
    n_ok = pre["ok_images"]
    meta = {"ok_images": n_ok, **_gx_meta(res)}
    failed = {label: r for label, r in res.items() if not r.success}
    if not failed:
        return True, f"all {n_ok} ok images within size, pixel and aspect bounds", meta
    meta["violations"] = {
        label: {"count": r.unexpected_count, "values": [_tidy_number(v) for v in r.examples],
                "image_ids": [e.get("image_id") for e in r.index_examples if isinstance(e, dict)]}
        for label, r in failed.items()}
    parts = []
    for label, r in failed.items():
        ids = meta["violations"][label]["image_ids"]
        part = f"{label}: {r.unexpected_count} violation(s)" if not r.exception \
            else f"{label}: GX error {r.exception}"
        values = meta["violations"][label]["values"]
        if values:
            part += f" (e.g. {_quote_list(values)}"
            part += f" at image_id {_quote_list(ids, 1)})" if ids else ")"
        parts.append(part)
    return False, f"ok images out of bounds ({n_ok} checked): " + "; ".join(parts), meta


def _items_have_images(res, items, images, cfg, pre):
    if pre["missing"]:
        cols = ", ".join(repr(c) for c in pre["missing"])
        return False, f"not checked: column(s) {cols} missing", {"missing_columns": pre["missing"]}
    if items.empty:
        return _empty("items")
    r = res["has_ok_catalog_image"]
    total = r.element_count or 0
    without = r.unexpected_count or 0
    share = without / total if total else 0.0
    examples = [e.get("item_id") for e in r.index_examples if isinstance(e, dict)]
    meta = {"items": total, "without_ok_catalog_image": without, "share": share,
            "max_share": cfg.quarantine_max_share, "unexpected_percent": r.unexpected_percent,
            "example_item_ids": examples, **_gx_meta(res)}
    cmp = "<=" if r.success else ">"
    desc = (f"{total - without} of {total} items have an ok {CATALOG_VIEW!r} image; "
            f"{without} without ({_pct(share)} {cmp} {_pct(cfg.quarantine_max_share)} allowed)")
    if images.empty:
        desc += "; images table is empty"
    if examples and without:
        desc += f", e.g. {_quote_list(examples)}"
    if r.success and without:
        desc += "; those items are dropped downstream"
    if r.exception:
        desc += f"; GX error {r.exception}"
    return r.success, desc, meta


def _duplicate_images(res, images, pre):
    if pre["missing"]:
        return _not_checked("images", pre["missing"])
    if images.empty:
        return _empty("images")
    r = res["sha256_unique_across_items"]
    meta = {"ok_images": pre["ok_images"], "duplicate_groups": pre["groups"],
            "items_involved": pre["items_involved"], "examples": pre["examples"], **_gx_meta(res)}
    if r.success:
        return (True, f"no byte-identical ok images shared by different items "
                      f"({pre['ok_images']} ok images)", meta)
    shown = "; ".join(f"{e['sha256']}: {', '.join(e['item_ids'])}" for e in pre["examples"][:3])
    desc = (f"{pre['groups']} sha256 value(s) shared by different items "
            f"({pre['items_involved']} items involved)")
    if shown:
        desc += f", e.g. {shown}"
    if r.exception:
        desc += f"; GX error {r.exception}"
    return False, desc, meta
