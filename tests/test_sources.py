"""Catalog sources: openclipart (on a fixture tree), manifest directories, synthetic; twin grouping."""
import pandas as pd
import pytest

from data.ingest import build_catalog
from data.schema import CatalogError
from data.sources import clean_title, load_manifest, load_openclipart, load_source
from core.config import Paths
from tests.conftest import write_manifest


def test_openclipart_one_item_per_png_with_clean_titles_and_categories(openclipart_tree):
    src = load_openclipart(openclipart_tree)
    assert len(src.items) == len(list(openclipart_tree.rglob("*.png"))) == 11
    assert src.items["item_id"].is_unique  # viewmag+ and viewmag- sanitize alike but stay distinct
    row = src.items.set_index("item_id").loc["animals--birds--Parrot_Jon_01"]
    assert row["title"] == "Parrot Jon" and row["category"] == "animals/birds"
    assert "recreation/music/cd_player" in set(src.items["category"])  # lower-cased folder path
    assert src.auto_group and not src.synthetic


def test_clean_title_drops_counters_and_separators():
    assert clean_title("chemistry_flask_matthew__02") == "chemistry flask matthew"
    assert clean_title("balloon-blue-aj") == "balloon blue aj"
    assert clean_title("fc22") == "fc22"


def test_openclipart_twins_join_one_instance(openclipart_tree, make_params):
    params = make_params({"dataset": {"source": "openclipart", "root": str(openclipart_tree)}})
    cat = build_catalog(load_openclipart(openclipart_tree), Paths.from_params(params).asset("raw"), params["ingest"],
                        params["validation"])
    g = cat.items.set_index("item_id")["group_id"]
    assert g["food--desserts--cone1_ganson"] == g["food--desserts--cone1_bw_ganson"]          # _bw version
    assert g["transportation--hummer_01"] == g["transportation--vehicles--hummer_01"]          # other size
    assert g["science--flask_02"] == g["education--flask_02"]                                 # same bytes
    assert g["animals--birds--Parrot_Jon_01"] != g["animals--birds--parrot_jon_02"]            # distinct
    assert cat.meta["instances"] == 8 and cat.meta["items"] == 11
    ok = cat.ok_images
    assert (ok["width"].combine(ok["height"], max) <= params["ingest"]["max_side"]).all()


def test_missing_openclipart_says_what_to_install(tmp_path):
    with pytest.raises(CatalogError, match="apt-get install -y openclipart-png"):
        load_openclipart(tmp_path / "nowhere")


@pytest.mark.parametrize("drop_file,drop_col", [("items.csv", None), ("images.csv", None),
                                                ("items.csv", "title"), ("items.csv", "category"),
                                                ("images.csv", "image")])
def test_manifest_errors_name_file_and_column(tmp_path, drop_file, drop_col):
    root = write_manifest(tmp_path / "m", n_items=3)
    if drop_col is None:
        (root / drop_file).unlink()
        expected = rf"{drop_file}: .*file not found"
    else:
        df = pd.read_csv(root / drop_file)
        df.drop(columns=[drop_col]).to_csv(root / drop_file, index=False)
        expected = rf"{drop_file}: missing column '{drop_col}'"
    with pytest.raises(CatalogError, match=expected):
        load_manifest(root)


def test_manifest_queries_need_image_or_text(tmp_path):
    root = write_manifest(tmp_path / "m", n_items=3)
    pd.DataFrame([{"query_id": "q1", "item_id": "item000"}]).to_csv(root / "queries.csv", index=False)
    with pytest.raises(CatalogError, match="queries.csv: needs an 'image' or a 'text' column"):
        load_manifest(root)


def test_manifest_loader_keeps_views_groups_and_extra_columns(tmp_path):
    root = write_manifest(tmp_path / "m", n_items=5, groups={1: "g", 2: "g"}, queries=True)
    items = pd.read_csv(root / "items.csv")
    items["brand"] = "acme"
    items.to_csv(root / "items.csv", index=False)
    src = load_manifest(root)
    assert set(src.images["view"]) == {"catalog", "shopper"}
    assert src.items.set_index("item_id").loc["item001", "group_id"] == "g"
    assert "brand" in src.items and src.queries is not None and len(src.queries) == 2
    assert src.images["source_path"].map(lambda p: p.startswith(str(root.resolve()))).all()


def test_synthetic_source_is_labelled(make_params):
    params = make_params()
    src = load_source(params, Paths.from_params(params))
    assert src.synthetic and src.name == "synthetic"
    cat = build_catalog(src, Paths.from_params(params).asset("raw"), params["ingest"], params["validation"])
    assert cat.meta["synthetic"] is True and cat.meta["source"] == "synthetic"


def test_limit_keeps_a_deterministic_subset(make_params):
    params = make_params({"dataset": {"limit": 10}})
    paths = Paths.from_params(params)
    a, b = load_source(params, paths), load_source(params, paths)
    assert len(a.items) == 10 and list(a.items["item_id"]) == list(b.items["item_id"])
    assert set(a.images["item_id"]) <= set(a.items["item_id"])
