"""data/queries.py: the text-only and image + text query sets beside the noisy-image ones."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from data.queries import (IMAGE, IMAGE_TEXT, MAX_WORDS, TEXT, given_queries, image_queries, plan_queries,
                          shopper_words)
from evaluation.retrieval import query_groups
from core.config import deep_merge

COLUMNS = ["query_id", "split", "level", "image", "text", "item_id", "group_id", "source_image_id", "seed",
           "modality"]
HARD = {"text_typo": 0.7, "text_abbrev": 0.6, "text_number": 0.6, "strength": 1.0}


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_three_modalities_with_their_columns(tiny_query_sets):
    t = tiny_query_sets
    q = t.queries
    assert COLUMNS == list(q.columns[:len(COLUMNS)]) and {"n_instance", "n_concept"} <= set(q.columns)
    assert set(q["modality"]) == {IMAGE, TEXT, IMAGE_TEXT}
    levels = t.params["queries"]["levels"]
    assert set(q.loc[q["modality"] == IMAGE, "level"]) == set(levels)
    words, photo_words = q[q["modality"] == TEXT], q[q["modality"] == IMAGE_TEXT]
    assert set(words["level"]) == {TEXT} and set(photo_words["level"]) == {IMAGE_TEXT}
    # one of each per held-out instance (and k), in both splits
    held = t.splits[t.splits["split"].isin(["val", "test"])]["group_id"].nunique()
    assert len(words) == len(photo_words) == held * t.params["queries"]["per_instance"]
    assert words["image"].isna().all() and words["source_image_id"].isna().all()
    assert words["text"].str.strip().str.len().gt(0).all()
    # image_text = the same words with the photo of the text_image_level query of that instance
    assert photo_words["text"].tolist() == words["text"].tolist()
    assert photo_words["item_id"].tolist() == words["item_id"].tolist()
    mild = q[q["level"] == t.params["queries"]["text_image_level"]].set_index("group_id")
    assert photo_words["image"].tolist() == mild.loc[photo_words["group_id"], "image"].tolist()
    assert all((t.root / p).is_file() for p in photo_words["image"])
    assert (q["n_instance"] >= 1).all() and q["query_id"].is_unique


def test_text_queries_never_equal_the_title(tiny_query_sets):
    q, items = tiny_query_sets.queries, tiny_query_sets.catalog.items.set_index("item_id")
    words = q[q["modality"] != IMAGE]
    titles = items.loc[words["item_id"], "title"]
    assert not any(norm(a) == norm(b) for a, b in zip(words["text"], titles))


def test_image_rows_are_unchanged_and_plans_are_deterministic(tiny_query_sets):
    t = tiny_query_sets
    with_words, tasks = plan_queries(t.catalog, t.splits, t.params["queries"], t.params["noise"], t.params["seed"])
    again, tasks_again = plan_queries(t.catalog, t.splits, t.params["queries"], t.params["noise"], t.params["seed"])
    pd.testing.assert_frame_equal(with_words, again)
    assert tasks == tasks_again
    off = deep_merge(t.params, {"queries": {"text_queries": False}})
    without, tasks_without = plan_queries(t.catalog, t.splits, off["queries"], off["noise"], off["seed"])
    assert set(without["modality"]) == {IMAGE}
    # the noisy-image rows (ids, images, texts, seeds) and the images rendered are those of before
    pd.testing.assert_frame_equal(image_queries(with_words).reset_index(drop=True), without)
    assert tasks == tasks_without   # the image_text photos reuse the mild images


def test_image_text_photo_is_rendered_when_its_level_is_not_a_query_level(tiny_query_sets):
    t = tiny_query_sets
    params = deep_merge(t.params, {"queries": {"levels": ["clean", "hard"]}})
    q, tasks = plan_queries(t.catalog, t.splits, params["queries"], params["noise"], params["seed"])
    photo_words = q[q["modality"] == IMAGE_TEXT]
    own = [task for task in tasks if "/image_text/" in task["dst"]]
    assert len(own) == len(photo_words) and {task["level"] for task in own} == {"mild"}
    assert set(photo_words["image"]) == {task["dst"] for task in own}


def test_words_come_from_keywords_when_the_catalog_has_them(tiny_query_sets):
    t = tiny_query_sets
    items = t.catalog.items.assign(keywords=lambda d: "kw-" + d["item_id"] + ", the gift, handmade")
    q, _ = plan_queries(dataclasses.replace(t.catalog, items=items), t.splits, t.params["queries"], t.params["noise"],
                        t.params["seed"])
    words = q[q["modality"] == TEXT]
    assert (words["text"] == "kw-" + words["item_id"] + " gift handmade").all()   # stop words dropped


def test_shopper_words_contract():
    titles = ["ox", "cd", "+", "Parrot", "red striped mug k7", "Black Leather Wallet with Coin Pocket"]
    for title in titles:
        outs = [shopper_words(title, HARD, seed) for seed in range(40)]
        assert all(norm(o) != norm(title) and o.strip() for o in outs), title
        assert outs == [shopper_words(title, HARD, seed) for seed in range(40)]
    assert len({shopper_words(titles[-1], HARD, s) for s in range(40)}) > 10   # paraphrases vary
    long = " ".join(f"word{i}" for i in range(20))
    picked = shopper_words("a title", HARD, 3, catalog_words=long).split()
    assert len(picked) == MAX_WORDS and picked == sorted(picked, key=lambda w: int(w[4:]))   # order kept
    # catalog words equal to the title are no shopper's words: the paraphrase is used instead
    assert norm(shopper_words("Blue Hat", HARD, 1, catalog_words="blue hat")) != "blue hat"


def test_given_queries_carry_their_modality_and_groups_split_by_it():
    catalog = type("C", (), {})()
    catalog.queries = pd.DataFrame({"query_id": ["a", "b", "c"], "image": ["q/a.png", None, "q/c.png"],
                                    "text": [None, "red mug", "blue hat"], "item_id": ["i1", "i2", "i3"],
                                    "status": ["ok"] * 3})
    splits = pd.DataFrame({"item_id": ["i1", "i2", "i3"], "group_id": ["g1", "g2", "g3"], "split": ["test"] * 3})
    q = given_queries(catalog, splits)
    assert q["modality"].tolist() == [IMAGE, TEXT, IMAGE_TEXT] and set(q["level"]) == {"given"}
    assert query_groups(q).tolist() == ["given", "given-text", "given-image_text"]
    assert len(image_queries(q)) == 3   # a manifest's own queries are never filtered away


def test_query_groups_are_the_levels_for_generated_queries(tiny_query_sets):
    q = tiny_query_sets.queries
    assert query_groups(q).tolist() == q["level"].tolist()
    assert query_groups(q.drop(columns="modality")).tolist() == q["level"].tolist()   # older query sets
    assert set(image_queries(q)["level"]) == set(tiny_query_sets.params["queries"]["levels"])
    assert np.array_equal(image_queries(q).index, q.index[q["modality"] == IMAGE])


@pytest.mark.parametrize("level", ["clean", "mild", "hard"])
def test_words_level_is_configurable(level, tiny_query_sets):
    t = tiny_query_sets
    params = deep_merge(t.params, {"queries": {"text_words_level": level}})
    q, _ = plan_queries(t.catalog, t.splits, params["queries"], params["noise"], params["seed"])
    titles = t.catalog.items.set_index("item_id")["title"]
    words = q[q["modality"] == TEXT]
    assert not any(norm(a) == norm(b) for a, b in zip(words["text"], titles.loc[words["item_id"]]))
