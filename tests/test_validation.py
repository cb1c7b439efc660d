"""data.validation: every rule passes on a good catalog and fails on its own planted defect."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from data.schema import IMAGE_COLUMNS, ITEM_COLUMNS, Catalog, coerce
from data.validation import CHECK_NAMES, RULES, CheckOutcome, failed_errors, validate_catalog, \
    validate_tables

PARAMS = {
    "validation": {"quarantine_max_share": 0.2, "title_min_chars": 1,
                   "category_pattern": r"^[a-z0-9][a-z0-9_\- ]*(/[a-z0-9][a-z0-9_\- ]*)*$"},
    "ingest": {"max_side": 384, "min_side": 12, "max_pixels": 25_000_000, "max_aspect": 20.0},
}
VALIDATION, INGEST = PARAMS["validation"], PARAMS["ingest"]


def make_tables(n: int = 10, views: tuple[str, ...] = ("catalog",)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """n good items, each with one ok image per view, in the normalized schema."""
    splits = ["train", "val", "test"]
    items = pd.DataFrame({
        "item_id": [f"item{i:05d}" for i in range(n)],
        "title": [f"Product number {i}" for i in range(n)],
        "category": [f"animals/cats {i % 7}" for i in range(n)],
        "group_id": [f"g{i:05d}" for i in range(n)],
        "split": [splits[i % 3] for i in range(n)],
    })
    rows = []
    for i in range(n):
        for v, view in enumerate(views):
            rows.append({"image_id": f"img{i:05d}_{v}", "item_id": f"item{i:05d}", "view": view,
                         "source_path": f"src/{i}_{v}.png", "path": f"images/{i}_{v}.png",
                         "status": "ok", "reason": None, "orig_width": 800 + i % 5,
                         "orig_height": 600, "width": 384, "height": 288,
                         "sha256": f"{i:08x}{v:04x}" + "ab" * 26, "dhash": f"{i:016x}",
                         "bytes": 1000 + i})
    return coerce(items, ITEM_COLUMNS), coerce(pd.DataFrame(rows), IMAGE_COLUMNS)


def by_name(outcomes: list[CheckOutcome]) -> dict[str, CheckOutcome]:
    return {o.name: o for o in outcomes}


def failed_names(outcomes: list[CheckOutcome]) -> set[str]:
    return {o.name for o in outcomes if not o.passed}


def quarantine(images: pd.DataFrame, rows: list[int], reason: str) -> None:
    for r in rows:
        images.loc[r, ["status", "reason", "path"]] = ["quarantined", reason, pd.NA]
        images.loc[r, ["width", "height"]] = pd.NA


# ---------------------------------------------------------------------------------------------

def test_good_tables_pass_every_check():
    items, images = make_tables(12, views=("catalog", "detail"))
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert [o.name for o in outcomes] == list(CHECK_NAMES)
    assert failed_names(outcomes) == set(), [o.description for o in outcomes if not o.passed]
    assert failed_errors(outcomes) == []
    for o in outcomes:
        assert o.severity == ("warn" if o.name == "duplicate_images" else "error")
        assert o.description and "\n" not in o.description
        json.dumps(o.metadata)   # JSON-able


def test_check_names_come_from_the_rules_one_outcome_each():
    assert CHECK_NAMES == tuple(r.name for r in RULES)
    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES)
    items, images = make_tables(3)
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert [(o.name, o.severity) for o in outcomes] == [(r.name, r.severity) for r in RULES]
    assert all(o.passed for o in outcomes)


def test_inputs_are_not_modified():
    items, images = make_tables(5)
    before_items, before_images = items.copy(), images.copy()
    validate_tables(items, images, VALIDATION, INGEST)
    pd.testing.assert_frame_equal(items, before_items)
    pd.testing.assert_frame_equal(images, before_images)


def test_validate_catalog_reads_the_catalog_tables(tmp_path):
    items, images = make_tables(4)
    catalog = Catalog(root=tmp_path, items=items, images=images,
                      quarantine=pd.DataFrame(), queries=None, meta={})
    assert failed_names(validate_catalog(catalog, VALIDATION, INGEST)) == set()


def test_parquet_round_trip_and_arrow_strings_pass(tmp_path):
    items, images = make_tables(6)
    items.to_parquet(tmp_path / "items.parquet")
    images.to_parquet(tmp_path / "images.parquet")
    outcomes = validate_tables(pd.read_parquet(tmp_path / "items.parquet"),
                               pd.read_parquet(tmp_path / "images.parquet"), VALIDATION, INGEST)
    assert failed_names(outcomes) == set()
    arrow_items = items.astype({c: "string[pyarrow]" for c in ITEM_COLUMNS})
    assert failed_names(validate_tables(arrow_items, images, VALIDATION, INGEST)) == set()
    object_items = items.astype(object).where(items.notna(), None)   # plain object columns
    assert failed_names(validate_tables(object_items, images, VALIDATION, INGEST)) == set()


# --- items_schema -------------------------------------------------------------------------------

def test_missing_column_fails_items_schema_naming_it():
    items, images = make_tables()
    outcomes = by_name(validate_tables(items.drop(columns=["category"]), images, VALIDATION, INGEST))
    schema = outcomes["items_schema"]
    assert not schema.passed and "'category'" in schema.description
    assert schema.metadata["missing_columns"] == ["category"]
    # the rule that needs the column cannot run: it fails too, saying why
    assert not outcomes["category_format"].passed
    assert "not checked" in outcomes["category_format"].description
    assert failed_names(outcomes.values()) == {"items_schema", "category_format"}


def test_bad_split_value_fails_items_schema():
    items, images = make_tables()
    items.loc[3, "split"] = "dev"
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"items_schema"}
    o = by_name(outcomes)["items_schema"]
    assert "'dev'" in o.description
    assert o.metadata["bad_split_count"] == 1 and o.metadata["bad_split_examples"] == ["dev"]


def test_non_string_column_fails_items_schema():
    items, images = make_tables()
    items["group_id"] = range(len(items))
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"items_schema"}
    o = by_name(outcomes)["items_schema"]
    assert "'group_id'" in o.description and "group_id" in o.metadata["bad_dtypes"]


# --- unique_item_id / titles / category --------------------------------------------------------

def test_duplicate_item_id_fails():
    items, images = make_tables()
    items.loc[5, "item_id"] = "item00002"
    images.loc[images["item_id"] == "item00005", "item_id"] = "item00002"
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"unique_item_id"}
    o = by_name(outcomes)["unique_item_id"]
    assert "item00002" in o.description
    assert o.metadata["duplicate_examples"] == [{"item_id": "item00002", "count": 2}]


def test_null_item_id_fails_unique_item_id():
    items, images = make_tables()
    items.loc[0, "item_id"] = pd.NA
    images = images[images["item_id"] != "item00000"]
    outcomes = by_name(validate_tables(items, images, VALIDATION, INGEST))
    assert not outcomes["unique_item_id"].passed
    assert outcomes["unique_item_id"].metadata["null_count"] == 1


def test_blank_title_fails():
    items, images = make_tables()
    items.loc[4, "title"] = "   "
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"titles_non_empty"}
    o = by_name(outcomes)["titles_non_empty"]
    assert "item00004" in o.description and o.metadata["too_short_count"] == 1
    assert o.metadata["example_item_ids"] == ["item00004"]


def test_bad_category_fails():
    items, images = make_tables()
    items.loc[2, "category"] = "Animals//Cats"
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"category_format"}
    o = by_name(outcomes)["category_format"]
    assert "Animals//Cats" in o.description
    assert o.metadata["mismatch_examples"] == ["Animals//Cats"]


# --- images ----------------------------------------------------------------------------------------

def test_image_of_unknown_item_fails_images_schema():
    items, images = make_tables()
    images.loc[1, "item_id"] = "ghost"
    # the item that lost its image is still one of 10 (10% <= 20% allowed)
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"images_schema"}
    o = by_name(outcomes)["images_schema"]
    assert "'ghost'" in o.description and o.metadata["unknown_item_id_examples"] == ["ghost"]


def test_duplicate_image_id_fails_images_schema():
    items, images = make_tables(views=("catalog", "detail"))
    images.loc[1, "image_id"] = images.loc[0, "image_id"]
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"images_schema"}
    assert "img00000_0" in by_name(outcomes)["images_schema"].description


def test_quarantine_share_above_threshold_fails():
    items, images = make_tables(10, views=("catalog", "detail"))
    detail = images.index[images["view"] == "detail"]
    quarantine(images, list(detail[:4]), "truncated")       # 4 of 20 = 20% -> passes
    quarantine(images, list(detail[4:5]), "not an image")   # 5 of 20 = 25% -> fails
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"images_decode"}
    o = by_name(outcomes)["images_decode"]
    assert o.description.startswith("5 of 20 images quarantined (25.0% > 20.0% allowed)")
    assert "4 truncated" in o.description and "1 not an image" in o.description
    assert o.metadata["quarantined"] == 5 and o.metadata["total"] == 20
    assert o.metadata["reason_counts"] == {"truncated": 4, "not an image": 1}
    assert len(o.metadata["examples"]) == 5 and o.metadata["examples"][0]["reason"] == "truncated"


def test_quarantine_three_of_ten_fails_two_of_ten_passes():
    items, images = make_tables(10, views=("catalog",))
    params = {**PARAMS, "validation": {**PARAMS["validation"], "quarantine_max_share": 0.25}}
    # items_have_images uses the same threshold; 3 items without image = 30% > 25% fails it too
    quarantine(images, [0, 1, 2], "truncated")
    outcomes = by_name(validate_tables(items, images, params["validation"], params["ingest"]))
    assert not outcomes["images_decode"].passed
    assert "3 of 10 images quarantined" in outcomes["images_decode"].description

    items, images = make_tables(10, views=("catalog",))
    quarantine(images, [0, 1], "truncated")
    outcomes = validate_tables(items, images, params["validation"], params["ingest"])
    assert failed_names(outcomes) == set()
    o = by_name(outcomes)["images_decode"]
    assert o.passed and o.description.startswith("2 of 10 images quarantined (20.0% <= 25.0%")
    assert o.metadata["quarantined"] == 2


def test_threshold_comes_from_params():
    items, images = make_tables(10, views=("catalog", "detail"))
    quarantine(images, [1, 3, 5], "truncated")   # 3 of 20 = 15%
    assert by_name(validate_tables(items, images, VALIDATION, INGEST))["images_decode"].passed
    strict = {**PARAMS, "validation": {**PARAMS["validation"], "quarantine_max_share": 0.1}}
    assert not by_name(validate_tables(items, images, strict["validation"], strict["ingest"]))["images_decode"].passed


def test_width_above_max_side_fails_image_dimensions():
    items, images = make_tables()
    images.loc[3, "width"] = 500
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"image_dimensions"}
    o = by_name(outcomes)["image_dimensions"]
    assert "width in [1, 384]" in o.description and "500 at image_id 'img00003_0'" in o.description
    assert o.metadata["violations"]["width in [1, 384]"]["image_ids"] == ["img00003_0"]


def test_orig_pixels_above_max_pixels_fails_image_dimensions():
    items, images = make_tables()
    images.loc[2, ["orig_width", "orig_height"]] = [6000, 5000]   # 30 MP > 25 MP
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"image_dimensions"}
    o = by_name(outcomes)["image_dimensions"]
    assert "orig_width*orig_height <= 25000000" in o.description
    assert "img00002_0" in o.description


def test_extreme_aspect_and_small_side_fail_image_dimensions():
    items, images = make_tables()
    images.loc[1, ["orig_width", "orig_height"]] = [2100, 100]   # aspect 21
    images.loc[2, "orig_height"] = 8                              # < min_side
    o = by_name(validate_tables(items, images, VALIDATION, INGEST))["image_dimensions"]
    assert not o.passed
    assert set(o.metadata["violations"]) == {"orig aspect <= 20", "orig_height >= 12"}


def test_quarantined_rows_are_not_dimension_checked():
    items, images = make_tables(10, views=("catalog", "detail"))
    quarantine(images, [1], "too large")
    images.loc[1, ["orig_width", "orig_height"]] = [90000, 90000]
    assert failed_names(validate_tables(items, images, VALIDATION, INGEST)) == set()


def test_items_without_ok_catalog_image_fail():
    items, images = make_tables(10, views=("catalog", "detail"))
    images = images[~images["item_id"].isin(["item00001"])].copy()        # no image at all
    images.loc[images["item_id"] == "item00002", "view"] = "detail"       # no catalog view
    cat = images.index[(images["item_id"].isin(["item00003", "item00004"]))
                       & (images["view"] == "catalog")]
    quarantine(images, list(cat), "truncated")                             # catalog quarantined
    outcomes = validate_tables(items, images, VALIDATION, INGEST)   # 4 of 10 > 20%; 2 of 18 images quarantined
    assert failed_names(outcomes) == {"items_have_images"}
    o = by_name(outcomes)["items_have_images"]
    assert o.metadata["without_ok_catalog_image"] == 4
    assert o.metadata["example_item_ids"] == ["item00001", "item00002", "item00003", "item00004"]
    assert "item00001" in o.description and "40.0% > 20.0%" in o.description


def test_one_item_without_image_is_tolerated():
    items, images = make_tables(10)
    images = images[images["item_id"] != "item00007"]
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == set()
    o = by_name(outcomes)["items_have_images"]
    assert o.metadata["without_ok_catalog_image"] == 1 and "dropped downstream" in o.description


def test_duplicate_sha_across_items_warns_without_blocking():
    items, images = make_tables(10, views=("catalog", "detail"))
    sha = images.loc[0, "sha256"]
    images.loc[images["image_id"] == "img00005_1", "sha256"] = sha
    outcomes = validate_tables(items, images, VALIDATION, INGEST)
    assert failed_names(outcomes) == {"duplicate_images"}
    o = by_name(outcomes)["duplicate_images"]
    assert o.severity == "warn" and not o.passed
    assert failed_errors(outcomes) == []
    assert o.metadata["duplicate_groups"] == 1
    assert o.metadata["examples"] == [{"sha256": sha[:12], "item_ids": ["item00000", "item00005"],
                                       "n_items": 2}]
    assert sha[:12] in o.description


def test_identical_images_inside_one_item_are_not_duplicates():
    items, images = make_tables(10, views=("catalog", "detail"))
    images.loc[1, "sha256"] = images.loc[0, "sha256"]   # both belong to item00000
    assert images.loc[0, "item_id"] == images.loc[1, "item_id"]
    assert failed_names(validate_tables(items, images, VALIDATION, INGEST)) == set()


# --- degenerate input ------------------------------------------------------------------------------

def test_empty_items_table_fails_cleanly():
    items, images = make_tables(5)
    outcomes = by_name(validate_tables(items.iloc[0:0], images, VALIDATION, INGEST))
    for name in ("items_schema", "unique_item_id", "titles_non_empty", "category_format",
                 "items_have_images"):
        assert not outcomes[name].passed, name
        assert "empty" in outcomes[name].description, name
    assert not outcomes["images_schema"].passed     # every image now points to an unknown item


def test_empty_images_table_fails_cleanly():
    items, images = make_tables(5)
    outcomes = by_name(validate_tables(items, images.iloc[0:0], VALIDATION, INGEST))
    for name in ("images_schema", "images_decode", "image_dimensions", "items_have_images",
                 "duplicate_images"):
        assert not outcomes[name].passed, name
    assert "empty" in outcomes["images_decode"].description
    assert "0 of 5 items" in outcomes["items_have_images"].description


def test_tables_without_columns_do_not_raise():
    outcomes = validate_tables(pd.DataFrame(), pd.DataFrame(), VALIDATION, INGEST)
    assert [o.name for o in outcomes] == list(CHECK_NAMES)
    assert failed_names(outcomes) == set(CHECK_NAMES)
    assert "'item_id'" in by_name(outcomes)["items_schema"].description
    assert "'sha256'" in by_name(outcomes)["images_schema"].description
    for o in outcomes:
        json.dumps(o.metadata)


def test_missing_params_raise():
    items, images = make_tables(3)
    with pytest.raises(ValueError):
        validate_tables(items, images, PARAMS["validation"], {})
    with pytest.raises(TypeError):
        validate_tables(items.to_dict(), images, VALIDATION, INGEST)


def test_eight_thousand_clean_rows_pass():
    # speed lives in BENCHMARKS.md (scripts/bench_ingest.py), not in a timed test
    items, images = make_tables(8000)
    assert failed_names(validate_tables(items, images, VALIDATION, INGEST)) == set()
