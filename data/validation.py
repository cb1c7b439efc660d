"""Catalog validation: a list of rules run with Great Expectations 1.x (ephemeral context, pandas
batches).

`validate_tables(items, images, validation, ingest)` (params["validation"], params["ingest"])
returns one `CheckOutcome` per rule in `RULES`, in that order (`CHECK_NAMES`). The Dagster
orchestration turns each outcome into an asset check; `validated_catalog` refuses to run while
`failed_errors(outcomes)` is not empty. Severity "warn" outcomes are reported only.

Bad data never raises: a missing column, an empty table or a wrong dtype becomes a failed outcome
whose description names the problem. Only programming errors raise (wrong argument types, a
validation or ingest section without its keys, an invalid category regex).

A rule (data/validation_gx.py `Rule`) plans a handful of expectations on one of a few frames (the
two tables, or small frames it derives from them with pandas) and words its outcome from their
results; all frames are validated in one ephemeral context per call. The rules live in
data/validation_items.py and data/validation_images.py; adding one means adding its object to
ITEM_RULES or IMAGE_RULES.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from data.validation_gx import Config, Plan, Rule, RulePlan, Tables, jsonable, normalize
from data.validation_images import IMAGE_RULES
from data.validation_items import ITEM_RULES

RULES: tuple[Rule, ...] = (*ITEM_RULES, *IMAGE_RULES)
CHECK_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)


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


def validate_catalog(catalog, validation: dict, ingest: dict) -> list[CheckOutcome]:
    """`validate_tables` on a loaded `data.schema.Catalog` (with its quarantined item rows)."""
    return validate_tables(catalog.items, catalog.images, validation, ingest,
                           item_quarantine=getattr(catalog, "item_quarantine", None),
                           meta=getattr(catalog, "meta", None))


def validate_tables(items: pd.DataFrame, images: pd.DataFrame, validation: dict, ingest: dict,
                    item_quarantine: pd.DataFrame | None = None,
                    meta: dict | None = None) -> list[CheckOutcome]:
    """Run every rule in RULES on the two catalog tables; never raises for bad data.
    validation, ingest: params["validation"], params["ingest"] (the image size limits);
    item_quarantine: the item rows quarantined at ingest (item_id, row, reason, rule); meta: the
    catalog's meta.json (its titles_truncated count is reported)."""
    if not isinstance(items, pd.DataFrame) or not isinstance(images, pd.DataFrame):
        raise TypeError("validate_tables expects two pandas DataFrames (items, images), got "
                        f"{type(items).__name__}, {type(images).__name__}")
    import great_expectations.expectations as gxe   # slow import: only when validating

    cfg = Config.from_params(validation, ingest)
    items, item_dupe_cols = normalize(items)
    images, image_dupe_cols = normalize(images)
    tables = Tables(items=items, images=images, item_dupe_cols=item_dupe_cols,
                    image_dupe_cols=image_dupe_cols,
                    item_quarantine=(item_quarantine if item_quarantine is not None
                                     else pd.DataFrame(columns=["item_id", "reason"])),
                    meta=meta or {})
    plan = Plan()
    plan.frame("items", items, ["item_id"])
    plan.frame("images", images, ["image_id", "item_id"])
    facts = [rule.plan(tables, cfg, RulePlan(plan, rule.name, gxe)) for rule in RULES]
    results = plan.run()
    outcomes = []
    for rule, rule_facts in zip(RULES, facts):
        passed, description, metadata = rule.outcome(results.get(rule.name, {}), tables, cfg,
                                                     rule_facts)
        outcomes.append(CheckOutcome(name=rule.name, passed=bool(passed), severity=rule.severity,
                                     description=description, metadata=jsonable(metadata)))
    return outcomes
