"""Real-world catalogs in: categories in any script with any punctuation and a configurable level
separator (compared normalised), titles in any script (NFKC, byte-level tokenizer, script-aware text
noise, long titles cut), bad item rows quarantined per item with their reason (only a share above
the configured one blocks), and items / images / queries as CSV (BOM, quoted newlines) or Parquet
with errors that name file, row and column."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from data.ingest import build_catalog
from data.judgments import CONCEPT, FUNCTIONAL, INSTANCE, IRRELEVANT, pair_levels, qrels, relevance
from data.noise import noise_text
from data.schema import CatalogError
from data.sources import ROW, load_manifest, load_source
from data.taxonomy import category_key
from data.validation import failed_errors, validate_catalog, validate_tables
from pailitao.stages import data as stages
from core.config import Paths, load_params
from tests.conftest import write_manifest
from tests.test_validation import PARAMS, by_name, make_tables

USER_CATEGORIES = ["Home & Kitchen/Pots, Pans", "Électronique/Téléphones", "服装/女装", "toys/Lego (Duplo)"]


def manifest(root, items: list[dict]):
    """write_manifest's images for len(items) items (ids item000, ...), with these item rows
    (an item without an item_id takes the index's; extra rows may repeat an id)."""
    n = sum(1 for it in items if "item_id" not in it)
    write_manifest(root, n_items=n)
    rows, k = [], 0
    for it in items:
        if "item_id" not in it:
            it = {"item_id": f"item{k:03d}", **it}
            k += 1
        rows.append({"title": "product", "category": "kitchen/mugs", "group_id": "", "split": "", **it})
    pd.DataFrame(rows).to_csv(root / "items.csv", index=False)
    return root


def failed(outcomes) -> set[str]:
    return {o.name for o in failed_errors(outcomes)}


# --- 1 taxonomies as users have them ---------------------------------------------------------

def test_user_categories_pass_validation(tmp_path, make_params):
    params = make_params()
    root = manifest(tmp_path / "m", [{"category": c, "title": f"thing {i}"}
                                     for i, c in enumerate(USER_CATEGORIES * 2)])
    cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])
    outcomes = validate_catalog(cat, params["validation"], params["ingest"])
    assert failed(outcomes) == set(), [o.description for o in failed_errors(outcomes)]
    assert len(cat.items) == 8 and cat.meta["items_quarantined"] == 0
    items = cat.items.set_index("item_id")
    assert items.loc["item000", "category"] == "home & kitchen/pots, pans"       # normalised key
    assert items.loc["item000", "category_display"] == "Home & Kitchen/Pots, Pans"   # text as given
    assert items.loc["item001", "category"] == "électronique/téléphones"
    assert items.loc["item002", "category"] == "服装/女装"
    # the structural rule on tables too: the keys pass, empty levels and over-deep paths fail
    tables_items, images = make_tables(4)
    tables_items["category"] = [category_key(c) for c in USER_CATEGORIES]
    structural = {**PARAMS["validation"], "category_pattern": None}
    assert by_name(validate_tables(tables_items, images, structural, PARAMS["ingest"]))["category_format"].passed
    tables_items.loc[1, "category"] = "a/" + "/".join("x" * 9)
    tables_items.loc[2, "category"] = "服装//女装"
    o = by_name(validate_tables(tables_items, images, structural, PARAMS["ingest"]))["category_format"]
    assert not o.passed and o.metadata["too_deep_count"] == 1 and o.metadata["empty_level_count"] == 1
    assert "服装//女装" in o.description


def test_google_taxonomy_separator_and_normalised_judgments(tmp_path, mlflow_uri):
    root = manifest(tmp_path / "m", [
        {"title": "phone a", "category": "Électronique > Téléphones", "group_id": "g1"},
        {"title": "phone b", "category": "électronique>téléphones"},
        {"title": "laptop", "category": "ÉLECTRONIQUE > Ordinateurs > Portables"},
        {"title": "pan", "category": "Maison & Jardin > Cuisine > Poêles/Casseroles"},
        {"title": "phone c", "category": "Électronique > Téléphones", "group_id": "g1"}])
    params = load_params("tiny", {"workdir": str(tmp_path / "work")},
                         sets=["dataset.source=manifest", f"dataset.root={root}",
                               "dataset.category_separator='>'"])
    cat = build_catalog(load_source(params, Paths.from_params(params)), tmp_path / "cat", params["ingest"],
                        params["validation"])
    assert failed(validate_catalog(cat, params["validation"], params["ingest"])) == set()
    items = cat.items.set_index("item_id")
    assert items.loc["item000", "category"] == items.loc["item001", "category"] == "électronique/téléphones"
    # a "/" inside a level stays inside it: three levels, not four
    assert items.loc["item003", "category"].count("/") == 2
    assert items.loc["item003", "category_display"] == "Maison & Jardin > Cuisine > Poêles/Casseroles"
    ids = ["item000"] * 4
    others = ["item004", "item001", "item002", "item003"]
    levels = pair_levels(items.loc[ids, "group_id"], items.loc[ids, "category"],
                         items.loc[others, "group_id"], items.loc[others, "category"])
    assert levels.tolist() == [INSTANCE, CONCEPT, FUNCTIONAL, IRRELEVANT]
    rel = qrels(pd.DataFrame({"query_id": ["q"], "item_id": ["item001"]}), cat.items)
    assert set(rel["item_id"]) == {"item000", "item001", "item004"}
    # judgments on tables that were never ingested compare normalised paths too
    assert relevance(["a"], ["Électronique/Téléphones"], ["b", "c"],
                     ["électronique / téléphones", "ÉLECTRONIQUE/tv"]).tolist() == [[CONCEPT, FUNCTIONAL]]
    # a bare > in YAML is an empty string: refused with a hint to quote it
    with pytest.raises(CatalogError, match="quote"):
        load_manifest(root, "")


# --- 2 titles in any script ------------------------------------------------------------------

def test_cjk_titles_tokenize_without_unknown_tokens(tmp_path, make_params):
    from training.backbone import build_tokenizer

    params = make_params()
    titles = ["女装连衣裙 夏季 新款", "ｉＰｈｏｎｅ　１５ 手机壳", "Téléphone « portable »", "日本語の商品 😀",
              "Кружка керамическая", "قميص قطني"]
    root = manifest(tmp_path / "m", [{"title": t} for t in titles])
    cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])
    stored = cat.items.set_index("item_id")["title"]
    assert stored["item001"] == "iPhone 15 手机壳"     # NFKC: full-width letters, ideographic space
    tok = build_tokenizer(list(stored), int(params["model"]["presets"]["tiny"]["vocab"]))
    for text in [*stored, "😀", "服装/女装 👗🏽"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and (tok.unk_token_id is None or tok.unk_token_id not in ids)
        assert tok.decode(ids) == text


def test_noise_text_applies_only_rules_that_fit_the_script():
    english_only = {"text_number": 1.0, "text_abbrev": 1.0, "strength": 1.0}
    for seed in range(40):
        for title in ["女装连衣裙 夏季新款 纯棉", "Кружка керамическая", "日本語の商品"]:
            assert noise_text(title, "hard", english_only, seed) == title, (seed, title)
        # mixed titles: the Latin words get the English rules, the others are left alone
        mixed = noise_text("手机壳 for iPhone", "hard", english_only, seed).split()
        assert mixed[0] == "手机壳"
    assert noise_text("black mug with lid", "hard", english_only, 0) != "black mug with lid"
    # typos are script-neutral: a CJK title may lose, swap or double a character, never gain "s"
    typo = {"text_typo": 1.0, "strength": 1.0}
    out = {noise_text("女装连衣裙", "hard", typo, s) for s in range(20)}
    assert out - {"女装连衣裙"} and all(set(o) <= set("女装连衣裙") for o in out)


def test_long_titles_are_cut_and_counted(tmp_path, make_params):
    params = make_params({"validation": {"title_max_chars": 40}})
    root = manifest(tmp_path / "m", [{"title": "very long title " * 10}, {"title": "short"},
                                     {"title": "長い" * 30}])
    cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])
    assert cat.items["title"].str.len().max() <= 40 and cat.meta["titles_truncated"] == 2
    o = by_name(validate_catalog(cat, params["validation"], params["ingest"]))["items_quarantine"]
    assert o.passed and o.metadata["titles_truncated"] == 2 and "2 title(s) cut to 40" in o.description


# --- 3 bad metadata rows quarantined per item -------------------------------------------------

BAD_ROWS = [{"title": ""},                                 # item001: missing title
            {"category": "  "},                            # item002: empty category
            {"category": "kitchen//mugs"},                 # item003: malformed path
            {"split": "training"},                         # item004: unknown split
            {"item_id": "item005", "title": "the other item005"}]   # item005 twice: both rows


def bad_manifest(root, n_good: int):
    rows = [{"title": f"good {i}"} for i in range(1)] + BAD_ROWS[:4] + [{"title": "first item005"}]
    rows += [{"title": f"good {i}"} for i in range(6, 6 + n_good)] + BAD_ROWS[4:]
    return manifest(root, rows)


def test_bad_item_rows_are_quarantined_with_their_reason(tmp_path, make_params):
    root = bad_manifest(tmp_path / "m", n_good=20)   # 27 rows, 6 quarantined: 22%
    params = make_params({"dataset": {"source": "manifest", "root": str(root)},
                          "validation": {"item_quarantine_max_share": 0.25}})
    raw = stages.raw_catalog(params)
    cat = stages.Catalog.load(raw.path)
    q = cat.item_quarantine.set_index(["item_id", "row"])
    reasons = {k: v for k, v in q["reason"].items()}
    assert reasons == {("item001", 3): "missing title", ("item002", 4): "empty category",
                       ("item003", 5): "malformed category path (empty level 2 of 3)",
                       ("item004", 6): "unknown split value ('training'; allowed: train, val, test)",
                       ("item005", 7): "duplicate item_id (2 rows)",
                       ("item005", 28): "duplicate item_id (2 rows)"}
    assert q.loc[("item003", 5), "category"] == "kitchen//mugs" and q.loc[("item003", 5), "images"] == 1
    assert dict(zip(q["reason"].str.split(" (", regex=False).str[0], q["rule"])) == {
        "missing title": "titles_non_empty", "empty category": "category_format",
        "malformed category path": "category_format", "unknown split value": "items_schema",
        "duplicate item_id": "unique_item_id"}
    bad_ids = {"item001", "item002", "item003", "item004", "item005"}
    assert not bad_ids & set(cat.items["item_id"]) and not bad_ids & set(cat.images["item_id"])
    assert raw.metrics["items_quarantined"] == 6 and raw.metrics["item_rows"] == 27
    assert raw.metrics["items_quarantined.duplicate_item_id"] == 2
    assert "unique_item_id" in raw.markdown["item_quarantine"]
    outcomes = by_name(stages.check_raw_catalog(params))
    o = outcomes["items_quarantine"]
    assert o.passed and o.metadata["reason_counts"] == {"duplicate item_id": 2, "missing title": 1,
                                                        "empty category": 1, "malformed category path": 1,
                                                        "unknown split value": 1}
    assert not failed_errors(outcomes.values())
    res = stages.validated_catalog(params)
    valid = stages.Catalog.load(res.path)
    assert len(valid.items) == 21 and not bad_ids & set(valid.images["item_id"])
    assert res.metrics["items_quarantined"] == 6 and "6 of 27 item rows" in res.markdown["item_quarantine"]
    run = mlflow.get_run(raw.run_id)
    assert run.data.metrics["items_quarantined"] == 6.0


def test_bad_item_rows_above_the_share_block(tmp_path, make_params):
    root = bad_manifest(tmp_path / "m", n_good=2)    # 9 rows, 6 quarantined
    params = make_params({"dataset": {"source": "manifest", "root": str(root)}})
    stages.raw_catalog(params)
    with pytest.raises(stages.ValidationFailed, match=r"items_quarantine: 6 of 9 item rows quarantined"):
        stages.validated_catalog(params)
    assert not Paths.from_params(params).asset("validated_catalog").exists()


# --- 5 inputs users have ------------------------------------------------------------------------

def test_parquet_manifest_loads_like_csv(tmp_path):
    root = write_manifest(tmp_path / "m", n_items=6, queries=True)
    items = pd.read_csv(root / "items.csv", dtype=str, keep_default_na=False)
    items["price"] = np.arange(6) * 1.5            # an extra column, kept with its type
    items.to_csv(root / "items.csv", index=False)
    csv_src = load_manifest(root)
    for stem in ("items", "images", "queries"):
        df = pd.read_csv(root / f"{stem}.csv", dtype=str, keep_default_na=False)
        if stem == "items":
            df["price"] = np.arange(6) * 1.5
        df.to_parquet(root / f"{stem}.parquet", index=False)
        (root / f"{stem}.csv").unlink()
    pq_src = load_manifest(root)
    for a, b in [(csv_src.items, pq_src.items), (csv_src.images, pq_src.images),
                 (csv_src.queries, pq_src.queries)]:
        a, b = a.drop(columns=[ROW], errors="ignore"), b.drop(columns=[ROW], errors="ignore")
        if "price" in a.columns:
            a["price"] = a["price"].astype(float)
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)
    assert pq_src.items["price"].dtype == float
    # integer ids in Parquet are read as text (items and images alike)
    ints = pd.read_parquet(root / "items.parquet").assign(item_id=range(6))
    ints.to_parquet(root / "items.parquet", index=False)
    imgs = pd.read_parquet(root / "images.parquet")
    imgs.assign(item_id=imgs["item_id"].str[4:].astype(int)).to_parquet(root / "images.parquet", index=False)
    src = load_manifest(root)
    assert list(src.items["item_id"]) == [str(i) for i in range(6)]
    assert set(src.images["item_id"]) <= set(src.items["item_id"])
    # a missing column names the file and the column
    ints.drop(columns=["category"]).to_parquet(root / "items.parquet", index=False)
    with pytest.raises(CatalogError, match=r"items\.parquet: missing column 'category'"):
        load_manifest(root)
    both = write_manifest(tmp_path / "both", n_items=2)
    pd.read_csv(both / "items.csv").to_parquet(both / "items.parquet")
    with pytest.raises(CatalogError, match="both items.csv and items.parquet"):
        load_manifest(both)


def test_csv_with_bom_and_quoted_newline_loads(tmp_path, make_params):
    root = write_manifest(tmp_path / "m", n_items=3)
    text = ('item_id,title,category,brand\r\n'
            'item000,"Mug\r\nwith handle, 350 ml",kitchen/mugs,acme\r\n'
            'item001,"Hat ""classic""",apparel/hats,\r\n'
            'item002,Shirt,apparel/shirts,acme\r\n')
    (root / "items.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    src = load_manifest(root)
    assert list(src.items.columns[:3]) == ["item_id", "title", "category"]
    assert len(src.items) == 3 and "brand" in src.items
    params = make_params()
    cat = build_catalog(src, tmp_path / "cat", params["ingest"], params["validation"])
    titles = cat.items.set_index("item_id")["title"]
    assert titles["item000"] == "Mug with handle, 350 ml" and titles["item001"] == 'Hat "classic"'
    assert set(cat.items["item_id"]) == {"item000", "item001", "item002"}


def test_non_utf8_byte_names_file_row_and_column(tmp_path):
    root = write_manifest(tmp_path / "m", n_items=3)
    raw = (root / "items.csv").read_bytes().splitlines(keepends=True)
    raw[3] = raw[3].replace(b"product 2", b"caf\xe9 2")       # Latin-1 "é" on the third item
    (root / "items.csv").write_bytes(b"".join(raw))
    with pytest.raises(CatalogError, match=r"items\.csv: row 4 \(line 4, column 'title'\): byte 0xe9"):
        load_manifest(root)
