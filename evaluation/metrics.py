"""Retrieval metrics over ranked lists with graded judgments (PAPER.md "How it is measured").

Every ranked-list metric takes ``levels``: an integer array [Q, K] holding, for each query, the
relevance level (``data.judgments``: 0 instance, 1 concept, 2 functional, 3 irrelevant) of its
ranked candidates, best first. Levels > 3 (e.g. padding) count as irrelevant everywhere. Per-query
metrics return float arrays [Q] in [0, 1]; queries for which a metric is undefined (no positive
document in the gallery) get ``nan``.

Paper metrics
  * I-HR@K: level-0 hits in the top min(K, G) / min(K, G), G = # level-0 docs in the gallery.
  * C-HR@K: the same with levels {0, 1} as positives and G = # docs of level 0 or 1.
  * Instance / concept precision, recall, F1 at the validation threshold of best F1.
Standard ones: R@K (any positive in the top K), MAP@R (Musgrave et al. 2020), NDCG@K (gain 3 - level).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from data.judgments import CONCEPT, FUNCTIONAL, INSTANCE, IRRELEVANT, top_level

N_LEVELS = 4
_PAD_IDS = (-1, None)


# ----------------------------------------------------------------------------- helpers
def _levels(levels) -> np.ndarray:
    lv = np.asarray(levels)
    if lv.ndim == 1:
        lv = lv[None, :]
    if lv.ndim != 2:
        raise ValueError(f"levels must be [Q, K], got shape {lv.shape}")
    return lv.astype(np.int64, copy=False)


def _per_query(x, q: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(x, dtype=np.float64), (q,)) if np.ndim(x) == 0 else np.asarray(x, dtype=np.float64)
    if arr.shape != (q,):
        raise ValueError(f"{name} must have one value per query ({q}), got shape {arr.shape}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0")
    return arr


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return int(k)


def _hits_in_top(rel: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Number of True in rel[q, :cutoff[q]] for each q (cutoff may exceed the list length)."""
    q, k = rel.shape
    csum = np.concatenate([np.zeros((q, 1), dtype=np.int64), np.cumsum(rel, axis=1, dtype=np.int64)], axis=1)
    idx = np.clip(cutoff, 0, k).astype(np.int64)
    return csum[np.arange(q), idx].astype(np.float64)


# ----------------------------------------------------------------------------- levels
def ranked_levels(ranked_ids: np.ndarray, q_group, q_category, d_group: dict | pd.Series, d_category) -> np.ndarray:
    """Levels int8 [Q, K] of ranked candidate item ids, with ``data.judgments.relevance`` semantics.

    ``d_group`` / ``d_category`` map item id -> group_id / category (dict or Series indexed by item id).
    Padding ids (-1, None, NaN; faiss returns -1 for missing neighbours) get IRRELEVANT; any other id
    absent from ``d_group`` raises KeyError.
    """
    ids = np.asarray(ranked_ids, dtype=object)
    if ids.ndim != 2:
        raise ValueError(f"ranked_ids must be [Q, K], got shape {ids.shape}")
    q, k = ids.shape
    qg = np.asarray(q_group, dtype=object).reshape(-1)
    qc = np.asarray(q_category, dtype=object).reshape(-1)
    if qg.shape[0] != q or qc.shape[0] != q:
        raise ValueError("q_group and q_category need one entry per row of ranked_ids")
    dg = d_group if isinstance(d_group, pd.Series) else pd.Series(d_group, dtype=object)
    dc = d_category if isinstance(d_category, pd.Series) else pd.Series(d_category, dtype=object)
    dc = dc.reindex(dg.index)

    flat = ids.reshape(-1)
    pos = dg.index.get_indexer(pd.Index(flat, dtype=object)) if len(dg) else np.full(flat.shape, -1)
    missing = pos < 0
    if missing.any():
        pad = np.array([v is None or (isinstance(v, (int, np.integer)) and v == -1)
                        or (isinstance(v, (float, np.floating)) and (np.isnan(v) or v == -1)) for v in flat[missing]])
        if not pad.all():
            raise KeyError(f"ranked ids not in the gallery: {list(flat[missing][~pad][:5])}")
    safe = np.where(missing, 0, pos)
    gal_g = np.asarray(dg.to_numpy(dtype=object), dtype=object)
    gal_c = np.asarray(dc.to_numpy(dtype=object), dtype=object)
    if len(gal_g) == 0:
        return np.full((q, k), IRRELEVANT, dtype=np.int8)
    cand_g = gal_g[safe].reshape(q, k)
    cand_c = gal_c[safe].reshape(q, k)
    cand_top = top_level(gal_c)[safe].reshape(q, k)
    q_top = top_level(qc)[:, None]

    levels = np.full((q, k), IRRELEVANT, dtype=np.int8)
    levels[q_top == cand_top] = FUNCTIONAL
    levels[qc[:, None] == cand_c] = CONCEPT
    levels[qg[:, None] == cand_g] = INSTANCE
    levels[missing.reshape(q, k)] = IRRELEVANT
    return levels


# ----------------------------------------------------------------------------- ranked-list metrics
def instance_hit_rate(levels: np.ndarray, n_relevant: np.ndarray, k: int, positive_max_level: int = 0) -> np.ndarray:
    """I-HR@K per query: (# positives in the top min(K, G)) / min(K, G), G = ``n_relevant`` (the number
    of positives in the whole gallery for that query). Positive = level <= ``positive_max_level``
    (0: I-HR; 1: C-HR, with ``n_relevant`` counting levels 0 and 1). A ranked list shorter than
    min(K, G) counts its missing slots as misses. G == 0 -> nan."""
    lv = _levels(levels)
    k = _check_k(k)
    g = _per_query(n_relevant, lv.shape[0], "n_relevant")
    m = np.minimum(k, g)
    hits = _hits_in_top(lv <= positive_max_level, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = hits / m
    out[g == 0] = np.nan
    return out


def concept_hit_rate(levels: np.ndarray, n_concept: np.ndarray, k: int) -> np.ndarray:
    """C-HR@K: ``instance_hit_rate`` with levels {0, 1} positive; ``n_concept`` = # docs of level 0 or 1."""
    return instance_hit_rate(levels, n_concept, k, positive_max_level=CONCEPT)


def recall_at_k(levels, k, positive_max_level=0) -> np.ndarray:
    """R@K per query: 1.0 if any positive (level <= ``positive_max_level``) is in the top k, else 0.0."""
    lv = _levels(levels)
    k = _check_k(k)
    return (lv[:, :k] <= positive_max_level).any(axis=1).astype(np.float64)


def map_at_r(levels, n_relevant, positive_max_level=0) -> np.ndarray:
    """MAP@R (Musgrave et al. 2020) per query: R = ``n_relevant``;
    (1/R) * sum_{i<=R} P@i * rel_i. Slots beyond the ranked list count as non-relevant. R == 0 -> nan."""
    lv = _levels(levels)
    q, kk = lv.shape
    r = _per_query(n_relevant, q, "n_relevant")
    rel = lv <= positive_max_level
    ranks = np.arange(1, kk + 1, dtype=np.float64)
    prec = np.cumsum(rel, axis=1, dtype=np.float64) / ranks[None, :]
    within = ranks[None, :] <= r[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (prec * rel * within).sum(axis=1) / r
    out[r == 0] = np.nan
    return out


def _gains(lv: np.ndarray) -> np.ndarray:
    return np.clip(IRRELEVANT - lv, 0, None).astype(np.float64)


def ndcg_at_k(levels, k, n_relevant_by_level: np.ndarray | None = None) -> np.ndarray:
    """NDCG@K per query with gain 3 - level (instance 3, concept 2, functional 1, irrelevant 0) and the
    standard discount 1 / log2(rank + 1). The ideal DCG comes from the gallery's level counts
    ``n_relevant_by_level`` ([Q, 4]: # docs at levels 0..3) when given, else from the ranked list
    itself (re-sorted). Ideal DCG == 0 -> nan."""
    lv = _levels(levels)
    k = _check_k(k)
    q = lv.shape[0]
    top = lv[:, :k]
    disc = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = (_gains(top) * disc[None, : top.shape[1]]).sum(axis=1)
    if n_relevant_by_level is None:
        ideal = -np.sort(-_gains(lv), axis=1)[:, :k]
        idcg = (ideal * disc[None, : ideal.shape[1]]).sum(axis=1)
    else:
        counts = np.asarray(n_relevant_by_level, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[0] != q or counts.shape[1] < IRRELEVANT:
            raise ValueError(f"n_relevant_by_level must be [Q, 4] level counts, got shape {counts.shape}")
        # the ideal list holds all level-0 docs, then level 1, then level 2: the gain at slot j
        # (0-based) is the number of cumulative counts (c0, c0+c1, c0+c1+c2) that exceed j.
        cum = np.cumsum(counts[:, :IRRELEVANT], axis=1)
        slots = np.arange(k, dtype=np.float64)
        ideal = (cum[:, None, :] > slots[None, :, None]).sum(axis=2).astype(np.float64)
        idcg = (ideal * disc[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dcg / idcg
    out[idcg == 0] = np.nan
    return out


# ----------------------------------------------------------------------------- report
def _nanmean_pct(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.all(np.isnan(x)):
        return float("nan")
    return float(np.nanmean(x) * 100.0)


def per_query_metrics(levels, n_instance, n_concept, ks=(1, 5, 10),
                      n_relevant_by_level: np.ndarray | None = None) -> pd.DataFrame:
    """One row per query (positional RangeIndex), columns I-HR@k, C-HR@k for each k in ``ks``, then
    R@k for each k, mAP@R (instance), NDCG@10: values in [0, 1], nan where undefined. This is what
    ``retrieval_report`` averages; it is exposed on its own because paired comparisons
    (``evaluation.compare``) need the per-query values, not the means. Arguments as in
    ``retrieval_report``."""
    lv = _levels(levels)
    q = lv.shape[0]
    n_inst = _per_query(n_instance, q, "n_instance")
    n_conc = _per_query(n_concept, q, "n_concept")
    if np.any(n_conc < n_inst):
        raise ValueError("n_concept counts levels 0 and 1, so it must be >= n_instance")

    cols: dict[str, np.ndarray] = {}
    for k in ks:
        cols[f"I-HR@{k}"] = instance_hit_rate(lv, n_inst, k, positive_max_level=INSTANCE)
        cols[f"C-HR@{k}"] = instance_hit_rate(lv, n_conc, k, positive_max_level=CONCEPT)
    for k in ks:
        r = recall_at_k(lv, k, positive_max_level=INSTANCE)
        r[n_inst == 0] = np.nan
        cols[f"R@{k}"] = r
    cols["mAP@R"] = map_at_r(lv, n_inst, positive_max_level=INSTANCE)
    if n_relevant_by_level is None:
        n_func_seen = (lv == FUNCTIONAL).sum(axis=1)
        n_relevant_by_level = np.stack([n_inst, n_conc - n_inst, n_func_seen, np.zeros(q)], axis=1)
    cols["NDCG@10"] = ndcg_at_k(lv, 10, n_relevant_by_level)
    return pd.DataFrame(cols, index=pd.RangeIndex(q, name="query"))


def retrieval_report(levels, n_instance, n_concept, ks=(1, 5, 10), groups: pd.Series | None = None,
                     n_relevant_by_level: np.ndarray | None = None) -> pd.DataFrame:
    """One row per group ("all" first, always present, then each value of ``groups`` in sorted
    order), indexed by ``group``; columns I-HR@k, C-HR@k, R@k for each k in ``ks``, mAP@R (instance),
    NDCG@10, n_queries. Metric values are nan-aware means in percent (0-100) like the paper.

    ``n_instance``: # level-0 docs per query in the gallery; ``n_concept``: # docs of level 0 OR 1.
    R@k is nan for queries without any instance in the gallery (undefined, like I-HR).
    NDCG@10's ideal uses ``n_relevant_by_level`` ([Q, 4]) when given; else gallery counts for levels 0
    and 1 and, for level 2 (unknown here), the number of level-2 docs seen in the ranked list (a lower
    bound, so NDCG stays <= 1).
    ``groups``: one label per query (positional; e.g. the query's noise level).
    The per-query values come from ``per_query_metrics``."""
    pq = per_query_metrics(levels, n_instance, n_concept, ks, n_relevant_by_level)
    q = len(pq)
    cols = {c: pq[c].to_numpy() for c in pq.columns}

    if groups is None:
        labels = None
    else:
        labels = np.asarray(groups.to_numpy() if isinstance(groups, pd.Series) else groups, dtype=object)
        if labels.shape != (q,):
            raise ValueError(f"groups must have one label per query ({q}), got shape {labels.shape}")

    selections: list[tuple[object, np.ndarray]] = [("all", np.ones(q, dtype=bool))]
    if labels is not None:
        uniq = pd.unique(pd.Series(labels, dtype=object))
        try:
            uniq = sorted(uniq)
        except TypeError:
            uniq = sorted(uniq, key=str)
        selections += [(g, labels == g) for g in uniq]

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, sel in selections:
            row = {c: _nanmean_pct(v[sel]) for c, v in cols.items()}
            row["n_queries"] = int(sel.sum())
            rows.append(row)
    out = pd.DataFrame(rows, index=pd.Index([name for name, _ in selections], name="group", dtype=object))
    return out[list(cols) + ["n_queries"]]


# ----------------------------------------------------------------------------- latency
def latency_summary(ms) -> dict:
    """Latency distribution of per-request times in milliseconds: n, mean, p50, p90, p95, p99, max
    (numpy's default linear-interpolated percentiles), all floats except n. Tails, not the mean, are
    what a serving SLO is written against, hence the high percentiles. nan entries are dropped; no
    values -> n = 0 and nan everywhere else."""
    x = np.asarray(ms, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    keys = ("mean", "p50", "p90", "p95", "p99", "max")
    if x.size == 0:
        return {"n": 0, **{k: float("nan") for k in keys}}
    p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99])
    return {"n": int(x.size), "mean": float(x.mean()), "p50": float(p50), "p90": float(p90),
            "p95": float(p95), "p99": float(p99), "max": float(x.max())}


# ----------------------------------------------------------------------------- thresholded P/R/F1
def precision_recall_f1(scores, positive, threshold) -> tuple[float, float, float]:
    """Precision, recall, F1 of predicting positive iff score >= threshold (0.0 where undefined)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError("scores and positive must have the same length")
    pred = s >= threshold
    tp = float(np.sum(pred & y))
    n_pred, n_pos = float(pred.sum()), float(y.sum())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_pos if n_pos else 0.0
    f1 = 2 * p * r / (p + r) if (p + r) else 0.0
    return p, r, f1


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float, float, float]:
    """Threshold (predict positive iff score >= threshold) with the best F1 on these (validation)
    scores, via ``sklearn.metrics.precision_recall_curve``; returns (threshold, precision, recall, f1).
    Ties in F1 go to the highest threshold. Without any positive, F1 is 0 for every threshold: returns
    (inf, 0, 0, 0), i.e. predict nothing."""
    from sklearn.metrics import precision_recall_curve

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError("scores and positive must have the same length")
    if s.size == 0 or not y.any():
        return float("inf"), 0.0, 0.0, 0.0
    precision, recall, thresholds = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (p=1, r=0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    best = np.flatnonzero(f1 == f1.max())[-1]  # thresholds ascend: last = highest threshold
    return float(thresholds[best]), float(p[best]), float(r[best]), float(f1[best])
