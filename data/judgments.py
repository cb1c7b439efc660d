"""Graded relevance derived from the catalog (data contract): same instance (group_id) = 0,
same leaf category = 1 (concept), same top-level category = 2 (functional), else 3."""
from __future__ import annotations

import numpy as np
import pandas as pd

INSTANCE, CONCEPT, FUNCTIONAL, IRRELEVANT = 0, 1, 2, 3
LEVEL_NAMES = {INSTANCE: "instance", CONCEPT: "concept", FUNCTIONAL: "functional", IRRELEVANT: "irrelevant"}


def top_level(category: pd.Series | np.ndarray) -> np.ndarray:
    return np.array([str(c).split("/", 1)[0] for c in category], dtype=object)


def relevance(q_group, q_category, d_group, d_category) -> np.ndarray:
    """Levels for every (query target, document) pair: arrays of length Q and N -> int8 [Q, N]."""
    qg, qc = np.asarray(q_group, dtype=object)[:, None], np.asarray(q_category, dtype=object)[:, None]
    dg, dc = np.asarray(d_group, dtype=object)[None, :], np.asarray(d_category, dtype=object)[None, :]
    levels = np.full((qg.shape[0], dg.shape[1]), IRRELEVANT, dtype=np.int8)
    levels[top_level(qc.ravel())[:, None] == top_level(dc.ravel())[None, :]] = FUNCTIONAL
    levels[qc == dc] = CONCEPT
    levels[qg == dg] = INSTANCE
    return levels


def pair_levels(q_group, q_category, d_group, d_category) -> np.ndarray:
    """Levels of aligned (query target, document) pairs: four arrays of length N -> int8 [N]."""
    qg, qc, dg, dc = (np.asarray(x, dtype=object) for x in (q_group, q_category, d_group, d_category))
    return np.where(qg == dg, INSTANCE, np.where(qc == dc, CONCEPT, np.where(
        top_level(qc) == top_level(dc), FUNCTIONAL, IRRELEVANT))).astype(np.int8)


def qrels(queries: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """query_id, item_id, level for every level-0 and level-1 document of each query (the sparse
    part; any document not listed is level 2 or 3, which `relevance` tells apart)."""
    q = queries[["query_id", "item_id"]].merge(items[["item_id", "group_id", "category"]], on="item_id")
    docs = items[["item_id", "group_id", "category"]].rename(columns={"item_id": "doc_id"})
    same_group = q.merge(docs, on="group_id")[["query_id", "doc_id"]].assign(level=INSTANCE)
    same_cat = q.merge(docs, on="category")[["query_id", "doc_id"]].assign(level=CONCEPT)
    out = pd.concat([same_group, same_cat]).sort_values("level").drop_duplicates(["query_id", "doc_id"])
    out = out.rename(columns={"doc_id": "item_id"}).sort_values(["query_id", "level", "item_id"])
    return out.astype({"level": "int8"}).reset_index(drop=True)
