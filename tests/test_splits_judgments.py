"""Splits by instance and graded judgments from a hand-made catalog."""
import numpy as np
import pandas as pd
import pytest

from data.judgments import CONCEPT, FUNCTIONAL, INSTANCE, IRRELEVANT, qrels, relevance
from data.schema import CatalogError
from data.splits import assign_splits

CFG = {"val": 0.2, "test": 0.2}


def _items(n=200, groups_of=2, split=None):
    ids = [f"i{k}" for k in range(n)]
    return pd.DataFrame({"item_id": ids, "group_id": [f"g{k // groups_of}" for k in range(n)],
                         "split": split if split is not None else [None] * n})


def test_split_is_deterministic_by_instance_with_roughly_the_asked_shares():
    items = _items()
    a, b = assign_splits(items, CFG, seed=0), assign_splits(items, CFG, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert (a.groupby("group_id")["split"].nunique() == 1).all()  # no instance straddles splits
    shares = a.drop_duplicates("group_id")["split"].value_counts(normalize=True)
    assert 0.1 < shares["test"] < 0.3 and 0.1 < shares["val"] < 0.3
    assert not assign_splits(items, CFG, seed=1)["split"].equals(a["split"])


def test_given_split_wins_and_val_is_carved_from_given_train():
    items = _items(split=["test" if k < 40 else "train" for k in range(200)])
    s = assign_splits(items, CFG, seed=0).set_index("item_id")["split"]
    assert (s[[f"i{k}" for k in range(40)]] == "test").all()
    rest = s[[f"i{k}" for k in range(40, 200)]]
    assert set(rest) == {"train", "val"} and "test" not in set(rest)


def test_split_errors_name_the_problem():
    mixed = _items(n=4, split=["train", "test", "train", "train"])
    with pytest.raises(CatalogError, match="group_id.*'g0'.*several splits"):
        assign_splits(mixed, CFG, 0)
    with pytest.raises(CatalogError, match=r"\['dev'\]"):
        assign_splits(_items(n=4, split=["dev"] * 4), CFG, 0)


def test_judgments_from_a_hand_made_catalog():
    items = pd.DataFrame({
        "item_id": ["red_cap", "red_cap_2", "blue_cap", "tshirt", "mug"],
        "group_id": ["cap1", "cap1", "cap2", "tee", "mug"],
        "category": ["apparel/hats", "apparel/hats", "apparel/hats", "apparel/shirts", "kitchen/mugs"]})
    lv = relevance(["cap1"], ["apparel/hats"], items["group_id"], items["category"])
    assert lv.tolist() == [[INSTANCE, INSTANCE, CONCEPT, FUNCTIONAL, IRRELEVANT]]
    queries = pd.DataFrame({"query_id": ["q1", "q2"], "item_id": ["red_cap", "mug"]})
    r = qrels(queries, items)
    got = {(q, i): l for q, i, l in r.itertuples(index=False)}
    assert got == {("q1", "red_cap"): 0, ("q1", "red_cap_2"): 0, ("q1", "blue_cap"): 1, ("q2", "mug"): 0}
    assert r["level"].dtype == np.int8
