"""evaluation/floors.py: the thumbnail kNN and text floors rank the whole catalog like a model and
are scored like one; a query a floor cannot answer is not applicable, not a miss."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from data.queries import IMAGE, TEXT
from evaluation import floors
from evaluation.metrics import retrieval_report
from evaluation.retrieval import TOP_K, gallery, rank_items, ranked_levels


def catalog_queries(t, column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One unnoised query per gallery image: its own image (copied under the query root) or its
    item's exact title. Returns (gallery, queries)."""
    g = gallery(t.catalog)
    rel = [f"catalog_copies/{i}.png" for i in g["image_id"]]
    for src, dst in zip(g["path"], rel):
        (t.root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(t.catalog.image_file(src), t.root / dst)
    q = pd.DataFrame({"query_id": g["image_id"], "item_id": g["item_id"], "level": "clean",
                      "image": rel if column == "image" else None,
                      "text": g["title"] if column == "text" else None,
                      "n_instance": 1, "n_concept": 1})
    return g, q


def test_thumbnail_knn_finds_an_unnoised_querys_own_item_first(tiny_query_sets):
    t = tiny_query_sets
    g, q = catalog_queries(t, "image")
    ranked = floors.thumbnail_knn(t.catalog, q, t.root)
    assert ranked.shape == (len(q), TOP_K) and ranked.dtype == object
    # an image that no other item shares is its own item's nearest thumbnail
    unique = ~g["sha256"].duplicated(keep=False).to_numpy()
    assert unique.sum() >= len(g) // 2
    assert (ranked[unique, 0] == g["item_id"].to_numpy()[unique]).all()
    assert (ranked_levels(ranked, q, t.catalog)[:, 0] == 0).all()   # a shared image: a twin of the instance


@pytest.mark.parametrize("name", ["bm25", "tfidf"])
def test_text_floors_find_an_item_from_its_exact_title(name, tiny_query_sets):
    t = tiny_query_sets
    g, q = catalog_queries(t, "text")
    ranked = floors.FLOORS[name](t.catalog, q, t.root)
    assert ranked.shape == (len(q), TOP_K)
    words = t.catalog.items.set_index("item_id")["title"].map(lambda s: frozenset(s.lower().split()))
    # near-identical products may share a title, twins may reorder it (a bag of words to BM25): the
    # first result has the query's words and the item ranks among the items that have them
    assert (words.loc[ranked[:, 0]].to_numpy() == words.loc[q["item_id"]].to_numpy()).all()
    same = words.loc[q["item_id"]].map(words.loc[g["item_id"].unique()].value_counts()).to_numpy()
    assert all(item in row[:n] for item, row, n in zip(q["item_id"], ranked, same))
    ids = [x for x in ranked.ravel() if x is not None]
    assert all(len(set(r) - {None}) == sum(x is not None for x in r) for r in ranked)   # distinct items
    assert set(ids) <= set(g["item_id"])


def test_floors_return_what_rank_items_returns(tiny_query_sets):
    t = tiny_query_sets
    q = t.queries[t.queries["split"] == "test"].reset_index(drop=True)
    g = gallery(t.catalog)
    like = rank_items(np.eye(len(q), 4, dtype=np.float32), g, np.eye(len(g), 4, dtype=np.float32))
    for name, fn in floors.FLOORS.items():
        ranked = fn(t.catalog, q, t.root)
        assert ranked.shape == like.shape and ranked.dtype == like.dtype, name
        off = ~floors.applicable(name, q)
        assert off.any() and all(x is None for x in ranked[off].ravel()), name   # not applicable: no result
    knn = floors.thumbnail_knn(t.catalog, q, t.root)
    assert all(r[0] is not None for r in knn[floors.applicable("thumbnail_knn", q)])   # a photo always has neighbours


def test_floor_report_scores_applicable_queries_and_marks_the_rest(tiny_query_sets):
    t = tiny_query_sets
    q = t.queries[t.queries["split"] == "test"].reset_index(drop=True)
    groups = sorted(set(q["level"]))
    for name in floors.FLOORS:
        rep = floors.floor_report(name, t.catalog, q, t.root)
        on = floors.applicable(name, q)
        assert list(rep.index) == ["all", *groups] and rep.index.name == "group"
        assert list(rep.columns) == list(retrieval_report(np.zeros((1, 10)), [1], [1]).columns)
        assert rep.loc["all", "n_queries"] == on.sum()
        for g in groups:
            n = int((on & (q["level"] == g)).sum())
            assert rep.loc[g, "n_queries"] == n
            assert rep.loc[g].drop("n_queries").isna().all() == (n == 0), (name, g)
    image = floors.floor_report("thumbnail_knn", t.catalog, q, t.root)
    assert image.loc[TEXT, "n_queries"] == 0 and image.loc["all", "n_queries"] == q["image"].notna().sum()
    words = floors.floor_report("bm25", t.catalog, q, t.root)
    photo_only = (q["modality"] == IMAGE) & q["text"].isna()
    assert photo_only.any() and words.loc["all", "n_queries"] == len(q) - photo_only.sum()


def test_floor_report_with_no_applicable_query(tiny_query_sets):
    t = tiny_query_sets
    q = t.queries[(t.queries["split"] == "test") & (t.queries["modality"] == TEXT)].reset_index(drop=True)
    rep = floors.floor_report("thumbnail_knn", t.catalog, q, t.root)
    assert list(rep.index) == ["all", TEXT] and (rep["n_queries"] == 0).all()
    assert rep.drop(columns="n_queries").isna().all().all()
    with pytest.raises(ValueError, match="unknown floor"):
        floors.floor_report("nope", t.catalog, q, t.root)


def test_thumbnail_is_small_centred_on_white(tmp_path):
    from PIL import Image

    im = Image.new("RGBA", (40, 10), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 40, 10))
    im.save(tmp_path / "wide.png")
    th = floors.thumbnail(tmp_path / "wide.png", size=8).reshape(8, 8, 3)
    assert th.shape == (8, 8, 3) and th.min() >= 0 and th.max() <= 1
    assert np.allclose(th[0], 1.0) and np.allclose(th[-1], 1.0)   # padded square with white, not stretched
    assert np.allclose(th[4, :, 0], 1.0) and th[4, :, 1].max() < 0.5   # the red band in the middle
