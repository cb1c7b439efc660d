"""Graded relevance derived from the catalog (data contract): same instance (group_id) = 0,
same leaf category = 1 (concept), same top-level category = 2 (functional), else 3.

Categories are compared as normalised paths (data/taxonomy.py: levels split by "/", each NFKC,
case-folded, whitespace collapsed): "Électronique/Téléphones" and "électronique / téléphones" are one
concept. A catalog stores keys already (normalising a key changes nothing), so this only matters
for tables that were never ingested."""
from __future__ import annotations

import numpy as np
import pandas as pd

from data.taxonomy import KEY_SEPARATOR, key_of

INSTANCE, CONCEPT, FUNCTIONAL, IRRELEVANT = 0, 1, 2, 3
LEVEL_NAMES = {INSTANCE: "instance", CONCEPT: "concept", FUNCTIONAL: "functional", IRRELEVANT: "irrelevant"}


def category_keys(category) -> np.ndarray:
    """The normalised key of every category (object array; a null stays as it is), each distinct
    value normalised once."""
    values = np.asarray(category, dtype=object).ravel()
    if len(values) <= 256:   # per query (evaluation): the cached lookup beats factorize
        return np.array([key_of(c) if isinstance(c, str) else c for c in values], dtype=object)
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    keys = np.array([key_of(u) if isinstance(u, str) else u for u in uniques], dtype=object)
    return keys[codes] if len(values) else values


def _top(keys: np.ndarray) -> np.ndarray:
    return np.array([str(c).split(KEY_SEPARATOR, 1)[0] for c in keys], dtype=object)


def top_level(category: pd.Series | np.ndarray) -> np.ndarray:
    """The normalised first level of every category."""
    return _top(category_keys(category))


def relevance(q_group, q_category, d_group, d_category) -> np.ndarray:
    """Levels for every (query target, document) pair: arrays of length Q and N -> int8 [Q, N]."""
    qg, qc = np.asarray(q_group, dtype=object)[:, None], category_keys(q_category)[:, None]
    dg, dc = np.asarray(d_group, dtype=object)[None, :], category_keys(d_category)[None, :]
    levels = np.full((qg.shape[0], dg.shape[1]), IRRELEVANT, dtype=np.int8)
    levels[_top(qc.ravel())[:, None] == _top(dc.ravel())[None, :]] = FUNCTIONAL
    levels[qc == dc] = CONCEPT
    levels[qg == dg] = INSTANCE
    return levels


def pair_levels(q_group, q_category, d_group, d_category) -> np.ndarray:
    """Levels of aligned (query target, document) pairs: four arrays of length N -> int8 [N]."""
    qg, dg = (np.asarray(x, dtype=object) for x in (q_group, d_group))
    qc, dc = category_keys(q_category), category_keys(d_category)
    return np.where(qg == dg, INSTANCE, np.where(qc == dc, CONCEPT, np.where(
        _top(qc) == _top(dc), FUNCTIONAL, IRRELEVANT))).astype(np.int8)


def qrels(queries: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """query_id, item_id, level for every level-0 and level-1 document of each query (the sparse
    part; any document not listed is level 2 or 3, which `relevance` tells apart)."""
    items = items[["item_id", "group_id", "category"]].assign(category=lambda d: category_keys(d["category"]))
    q = queries[["query_id", "item_id"]].merge(items, on="item_id")
    docs = items[["item_id", "group_id", "category"]].rename(columns={"item_id": "doc_id"})
    same_group = q.merge(docs, on="group_id")[["query_id", "doc_id"]].assign(level=INSTANCE)
    same_cat = q.merge(docs, on="category")[["query_id", "doc_id"]].assign(level=CONCEPT)
    out = pd.concat([same_group, same_cat]).sort_values("level").drop_duplicates(["query_id", "doc_id"])
    out = out.rename(columns={"doc_id": "item_id"}).sort_values(["query_id", "level", "item_id"])
    return out.astype({"level": "int8"}).reset_index(drop=True)
