"""What the catalog validation rules (data/validation_items.py, data/validation_images.py) share:
the `Rule` interface, the validation config read from the validation and ingest params sections,
the normalised input `Tables`, the Great Expectations plumbing that runs every rule's expectations
in one ephemeral context, and the small formatting helpers the outcomes are worded with.

GX runs the expectations and decides pass/fail; each rule words its own outcome from the results.
"""
from __future__ import annotations

import math
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

MAX_EXAMPLES = 10
# dtype names GX's ExpectColumnValuesToBeInTypeList accepts for pandas: "StringDtype" matches the
# pandas string extension dtype (string-like columns are cast to pd.StringDtype() first, whatever
# their storage), "object" + "str" matches object columns whose non-null values are all str.
STRING_TYPES = ["StringDtype", "object", "str"]
INT_TYPES = ["Int64Dtype", "Int32Dtype", "Int16Dtype", "Int8Dtype",
             "UInt64Dtype", "UInt32Dtype", "UInt16Dtype", "UInt8Dtype",
             "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"]

Verdict = tuple[bool, str, dict]   # (passed, one-line description, JSON-able metadata)


@dataclass(frozen=True)
class Config:
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
    def from_params(cls, validation: dict, ingest: dict) -> "Config":
        """From params["validation"] and params["ingest"] (its image size limits)."""
        try:
            v, ing = validation, ingest
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


@dataclass(frozen=True)
class Tables:
    """The validated input: both tables normalised (see `normalize`), with what that dropped."""
    items: pd.DataFrame
    images: pd.DataFrame
    item_dupe_cols: list[str]
    image_dupe_cols: list[str]
    item_quarantine: pd.DataFrame   # item rows quarantined at ingest (item_id, row, reason, rule)
    meta: dict                      # the catalog's meta.json (titles_truncated, title_max_chars)


@dataclass
class Result:
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


class Plan:
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

    def run(self) -> dict[str, dict[str, Result]]:
        """{check: {label: Result}} for every planned expectation."""
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas("pailitao_catalog")
        results: dict[str, dict[str, Result]] = {}
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
                results.setdefault(meta["check"], {})[meta["label"]] = _to_result(evr)
        missing = [(c, lb) for exps in self.expectations.values() for c, lb, _ in exps
                   if lb not in results.get(c, {})]
        if missing:
            raise RuntimeError(f"GX returned no result for {missing}")
        return results


class RulePlan:
    """One rule's view of the `Plan`: its expectations are tagged with the rule's name."""

    def __init__(self, plan: Plan, check: str, gxe) -> None:
        self._plan, self._check = plan, check
        self.gxe = gxe   # great_expectations.expectations, imported once by the caller (slow import)

    def frame(self, name: str, df: pd.DataFrame, key_columns: Iterable[str] = ()) -> None:
        self._plan.frame(name, df, key_columns)

    def expect(self, frame: str, label: str, expectation) -> None:
        self._plan.expect(frame, self._check, label, expectation)


class Rule(ABC):
    """One catalog check. `plan` adds its expectations (on the "items" / "images" frames or on
    frames it derives) and returns the pandas-side facts its outcome needs; `outcome` turns its GX
    results, by label, into a `Verdict`. Bad data never raises: a missing column or an empty table
    is a failed verdict that says so."""
    name: str          # stable snake_case id, the Dagster asset-check name
    severity: str      # "error" (blocks downstream) or "warn" (reported only)
    description: str   # what the rule checks, one line

    @abstractmethod
    def plan(self, t: Tables, cfg: Config, p: RulePlan) -> dict:
        ...

    @abstractmethod
    def outcome(self, res: dict[str, Result], t: Tables, cfg: Config, facts: dict) -> Verdict:
        ...


def _to_result(evr) -> Result:
    res = dict(evr.result or {})
    info = evr.exception_info or {}
    raised = bool(info.get("raised_exception")) if isinstance(info, dict) else False
    exception = (info.get("exception_message") or "exception") if raised else None
    return Result(
        success=bool(evr.success) and not raised,
        element_count=jsonable(res.get("element_count")),
        unexpected_count=jsonable(res.get("unexpected_count")),
        unexpected_percent=jsonable(res.get("unexpected_percent")),
        examples=jsonable(list(res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]),
        index_examples=jsonable(list(res.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]),
        observed=jsonable(res.get("observed_value")),
        exception=exception)


# ---------------------------------------------------------------------------------------------
# frames

def _is_string_like(dtype) -> bool:
    if isinstance(dtype, pd.StringDtype):
        return True
    if isinstance(dtype, pd.ArrowDtype):
        import pyarrow as pa
        return pa.types.is_string(dtype.pyarrow_dtype) or pa.types.is_large_string(dtype.pyarrow_dtype)
    return False


def normalize(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
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


def as_str(series: pd.Series) -> pd.Series:
    return series.astype(pd.StringDtype())


def equals(series: pd.Series, value: str) -> pd.Series:
    """Elementwise series == value as plain bool (null -> False)."""
    return (as_str(series) == value).fillna(False).astype(bool)


def as_float(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").astype("Float64").to_numpy(dtype="float64",
                                                                              na_value=np.nan)


# ---------------------------------------------------------------------------------------------
# outcome wording and metadata

def jsonable(x: Any) -> Any:
    """numpy / pandas scalars, NA and nested containers -> plain JSON types."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
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


def tidy_number(v: Any) -> Any:
    """500.0 -> 500 (the ok-image dimension frame is float); other values unchanged."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def pct(share: float) -> str:
    return f"{100.0 * share:.1f}%"


def quote_list(values: Iterable[Any], limit: int = 3) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def gx_meta(results: dict[str, Result]) -> dict:
    return {"expectations": {label: r.summary() for label, r in results.items()}}


def not_checked(table: str, missing: list[str]) -> Verdict:
    cols = ", ".join(repr(c) for c in missing)
    return False, f"not checked: {table} column(s) {cols} missing", {"missing_columns": missing}


def empty(table: str, extra: dict | None = None) -> Verdict:
    return False, f"{table} table is empty (0 rows): nothing to validate", {"rows": 0, **(extra or {})}


def exception_notes(results: dict[str, Result]) -> list[str]:
    return [f"{label}: GX error {r.exception}" for label, r in results.items() if r.exception]


def failed(desc: str, results: dict[str, Result], meta: dict) -> Verdict:
    """A failed rule's verdict: its description plus any GX exception notes."""
    notes = exception_notes(results)
    return False, desc + ("; " + "; ".join(notes) if notes else ""), meta


def shape_problems(res: dict[str, Result], missing: list, type_problems: list[str], dupe_cols: list) -> list[str]:
    """A table's shape problems in the order a schema rule reports them: empty, missing columns,
    columns of the wrong type (worded by the rule), duplicated column names."""
    problems = ["table is empty (0 rows)"] if not res["rows"].success else []
    if missing:
        problems.append("missing column(s) " + ", ".join(repr(c) for c in missing))
    problems += type_problems
    if dupe_cols:
        problems.append("duplicated column name(s) " + ", ".join(repr(c) for c in dupe_cols))
    return problems


def schema_verdict(table: str, problems: list[str], res: dict[str, Result], meta: dict, ok: str) -> Verdict:
    """A schema rule's verdict: its problems plus GX exception notes (the dtype checks' own
    exceptions are already worded as problems), else `ok`."""
    problems = problems + exception_notes({k: v for k, v in res.items() if not k.startswith("type:")})
    if problems:
        return False, f"{table} schema: " + "; ".join(problems), meta
    return True, ok, meta
