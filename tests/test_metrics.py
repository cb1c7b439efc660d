"""evaluation.metrics against hand computations (arithmetic in the comments), torchmetrics where an
equivalent exists, and a brute-force threshold search."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_average_precision,
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_precision,
    retrieval_r_precision,
)

from data.judgments import relevance
from evaluation.metrics import (
    best_f1_threshold,
    concept_hit_rate,
    instance_hit_rate,
    latency_summary,
    map_at_r,
    ndcg_at_k,
    per_query_metrics,
    precision_recall_f1,
    ranked_levels,
    recall_at_k,
    retrieval_report,
)

# two queries, ranked lists of 6 candidates
LEVELS = np.array([
    [1, 0, 3, 0, 2, 0],   # query A
    [0, 0, 1, 3, 1, 2],   # query B
])


def _tm_preds(n: int) -> torch.Tensor:
    # strictly positive, strictly decreasing scores: torchmetrics' ranking is the list order
    return torch.arange(n, 0, -1, dtype=torch.float32)


# ----------------------------------------------------------------------------- I-HR / C-HR
def test_ihr_g_smaller_than_k():
    # A: G = 2 level-0 docs in the gallery, K = 5 -> min(K, G) = 2; top-2 = [1, 0] -> 1 hit -> 1/2
    # B: G = 2, top-2 = [0, 0] -> 2 hits -> 2/2 = 1
    out = instance_hit_rate(LEVELS, np.array([2, 2]), k=5)
    np.testing.assert_allclose(out, [0.5, 1.0])


def test_ihr_g_larger_than_k():
    # A: G = 10, K = 4 -> min = 4; top-4 = [1, 0, 3, 0] -> 2 hits -> 2/4 = 0.5
    # B: G = 10, top-4 = [0, 0, 1, 3] -> 2 hits -> 0.5
    out = instance_hit_rate(LEVELS, np.array([10, 10]), k=4)
    np.testing.assert_allclose(out, [0.5, 0.5])
    # K = 1: A top-1 = [1] -> 0/1; B top-1 = [0] -> 1/1
    np.testing.assert_allclose(instance_hit_rate(LEVELS, np.array([10, 10]), k=1), [0.0, 1.0])


def test_ihr_list_shorter_than_min_k_g_and_g_zero():
    # A: G = 9, K = 8 -> min = 8 but only 6 ranked; 3 hits in the list -> 3/8
    # B: G = 0 -> undefined -> nan
    out = instance_hit_rate(LEVELS, np.array([9, 0]), k=8)
    assert out[0] == pytest.approx(3 / 8)
    assert np.isnan(out[1])


def test_chr_counts_levels_0_and_1():
    # C-HR positives: levels {0, 1}
    # A: n_concept G = 3, K = 5 -> min = 3; top-3 = [1, 0, 3] -> 2 hits -> 2/3
    # B: G = 20, K = 5 -> min = 5; top-5 = [0, 0, 1, 3, 1] -> 4 hits -> 4/5
    out = instance_hit_rate(LEVELS, np.array([3, 20]), k=5, positive_max_level=1)
    np.testing.assert_allclose(out, [2 / 3, 4 / 5])
    np.testing.assert_allclose(concept_hit_rate(LEVELS, np.array([3, 20]), k=5), out)
    # the same query with I-HR (level 0 only): A top-3 -> 1/3 ; B top-5 -> 2/5
    np.testing.assert_allclose(instance_hit_rate(LEVELS, np.array([3, 20]), k=5), [1 / 3, 2 / 5])


def test_ihr_matches_torchmetrics_precision_and_r_precision():
    # when the ranked list is the whole gallery: G >= K -> I-HR@K = P@K ; G <= K -> I-HR@K = R-precision
    rng = np.random.default_rng(0)
    for _ in range(20):
        lv = rng.integers(0, 4, size=(1, 12))
        g = int((lv == 0).sum())
        if g == 0:
            continue
        target = torch.from_numpy(lv[0] == 0)
        for k in (1, 3, 5, 12):
            ours = instance_hit_rate(lv, np.array([g]), k)[0]
            if g >= k:
                ref = retrieval_precision(_tm_preds(12), target, top_k=k).item()
            else:
                ref = retrieval_r_precision(_tm_preds(12), target).item()
            assert ours == pytest.approx(ref, abs=1e-6)


# ----------------------------------------------------------------------------- R@K
def test_recall_at_k_hand_and_torchmetrics():
    # A: first level-0 at rank 2 -> R@1 = 0, R@2 = 1 ; B: rank 1 -> R@1 = 1
    np.testing.assert_allclose(recall_at_k(LEVELS, 1), [0.0, 1.0])
    np.testing.assert_allclose(recall_at_k(LEVELS, 2), [1.0, 1.0])
    # concept: A rank 1 is level 1 -> R@1 = 1
    np.testing.assert_allclose(recall_at_k(LEVELS, 1, positive_max_level=1), [1.0, 1.0])
    # a query with no level-0 at all -> 0
    np.testing.assert_allclose(recall_at_k(np.array([[1, 2, 3]]), 3), [0.0])
    rng = np.random.default_rng(1)
    lv = rng.integers(0, 4, size=(30, 8))
    for k in (1, 3, 8):
        ref = [retrieval_hit_rate(_tm_preds(8), torch.from_numpy(row == 0), top_k=k).item() for row in lv]
        np.testing.assert_allclose(recall_at_k(lv, k), ref)


# ----------------------------------------------------------------------------- MAP@R
def test_map_at_r_hand():
    # A: R = 3 level-0 docs; first 3 ranks = [1, 0, 3] -> rel = [0, 1, 0]
    #    P@2 = 1/2 -> MAP@R = (1/2) / 3 = 1/6
    # B: R = 4; first 4 = [0, 0, 1, 3] -> rel = [1, 1, 0, 0]; P@1 = 1, P@2 = 1 -> (1 + 1) / 4 = 0.5
    np.testing.assert_allclose(map_at_r(LEVELS, np.array([3, 4])), [1 / 6, 0.5])
    # concept positives (levels 0, 1), A: R = 4, first 4 = [1, 0, 3, 0] -> rel = [1, 1, 0, 1]
    #    P@1 = 1, P@2 = 1, P@4 = 3/4 -> (1 + 1 + 0.75) / 4 = 0.6875
    assert map_at_r(LEVELS[:1], np.array([4]), positive_max_level=1)[0] == pytest.approx(0.6875)


def test_map_at_r_short_list_and_zero():
    # A: R = 8 but only 6 ranked; rel = [0,1,0,1,0,1] -> P@2 = 1/2, P@4 = 2/4, P@6 = 3/6
    #    (0.5 + 0.5 + 0.5) / 8 = 0.1875 (the 2 missing slots count as misses)
    # B: R = 0 -> nan
    out = map_at_r(LEVELS, np.array([8, 0]))
    assert out[0] == pytest.approx(0.1875)
    assert np.isnan(out[1])


def test_map_at_r_vs_torchmetrics():
    # torchmetrics' AP@k divides by the number of relevant docs found in the top k (h) instead of R:
    # MAP@R = AP@R(torchmetrics) * h / R ; and when all R relevant are in the top R both are 1.
    rng = np.random.default_rng(2)
    for _ in range(50):
        lv = rng.integers(0, 4, size=(1, 10))
        target = torch.from_numpy(lv[0] == 0)
        r = int(target.sum())
        if r == 0:
            continue
        h = int(target[:r].sum())
        ref = retrieval_average_precision(_tm_preds(10), target, top_k=r).item() * h / r
        assert map_at_r(lv, np.array([r]))[0] == pytest.approx(ref, abs=1e-6)
    perfect = np.array([[0, 0, 0, 2, 3]])
    assert map_at_r(perfect, np.array([3]))[0] == pytest.approx(
        retrieval_average_precision(_tm_preds(5), torch.tensor([1, 1, 1, 0, 0]).bool(), top_k=3).item())


# ----------------------------------------------------------------------------- NDCG
def test_ndcg_hand():
    # A = [1, 0, 3, 0, 2, 0] -> gains [2, 3, 0, 3, 1, 3]; discounts 1/log2(i+1): 1, 0.63093, 0.5, 0.43068
    # DCG@4 = 2*1 + 3*0.63093 + 0 + 3*0.43068 = 2 + 1.89279 + 1.29203 = 5.18482
    # ideal from the list itself: gains sorted [3, 3, 3, 2, ...] -> 3 + 1.89279 + 1.5 + 0.86135 = 7.25414
    d = [1 / math.log2(i + 1) for i in range(1, 5)]
    dcg = 2 * d[0] + 3 * d[1] + 0 * d[2] + 3 * d[3]
    idcg_list = 3 * d[0] + 3 * d[1] + 3 * d[2] + 2 * d[3]
    assert ndcg_at_k(LEVELS[:1], 4)[0] == pytest.approx(dcg / idcg_list)
    assert dcg / idcg_list == pytest.approx(0.71475, abs=1e-4)
    # ideal from gallery counts [n0, n1, n2, n3] = [1, 0, 5, 100]: ideal gains [3, 1, 1, 1]
    idcg_counts = 3 * d[0] + 1 * d[1] + 1 * d[2] + 1 * d[3]
    assert ndcg_at_k(LEVELS[:1], 4, np.array([[1, 0, 5, 100]]))[0] == pytest.approx(dcg / idcg_counts)
    # counts [0, 0, 0, 9] -> ideal DCG 0 -> nan
    assert np.isnan(ndcg_at_k(LEVELS[:1], 4, np.array([[0, 0, 0, 9]]))[0])


def test_ndcg_vs_torchmetrics():
    rng = np.random.default_rng(3)
    lv = rng.integers(0, 4, size=(40, 9))
    lv[0] = 3  # all irrelevant: torchmetrics gives 0, ours nan
    counts = np.stack([(lv == l).sum(axis=1) for l in range(4)], axis=1)
    for k in (1, 5, 9, 20):
        ours = ndcg_at_k(lv, k)
        ours_counts = ndcg_at_k(lv, k, counts)  # gallery == the ranked list -> same ideal
        np.testing.assert_allclose(ours, ours_counts)
        ref = np.array([retrieval_normalized_dcg(_tm_preds(9), torch.from_numpy(3 - row), top_k=k).item()
                        for row in lv])
        assert np.isnan(ours[0]) and ref[0] == 0
        np.testing.assert_allclose(ours[1:], ref[1:], atol=1e-6)


# ----------------------------------------------------------------------------- ranked_levels
def test_ranked_levels_matches_relevance():
    items = pd.DataFrame({
        "item_id": [10, 11, 12, 13, 14],
        "group_id": ["g1", "g1", "g2", "g3", "g4"],
        "category": ["a/x", "a/x", "a/x", "a/y", "b/z"],
    })
    d_group = items.set_index("item_id")["group_id"]
    d_cat = dict(zip(items.item_id, items.category))
    q_group, q_cat = ["g1", "g4"], ["a/x", "b/z"]
    ranked = np.array([[11, 12, 13, 14], [14, 10, 13, -1]])
    lv = ranked_levels(ranked, q_group, q_cat, d_group, d_cat)
    # q1 (g1, a/x): 11 same group -> 0, 12 same leaf -> 1, 13 same top "a" -> 2, 14 -> 3
    # q2 (g4, b/z): 14 -> 0, 10 -> 3, 13 -> 3, -1 padding -> 3
    np.testing.assert_array_equal(lv, [[0, 1, 2, 3], [0, 3, 3, 3]])
    full = relevance(q_group, q_cat, items.group_id, items.category)
    pos = {iid: i for i, iid in enumerate(items.item_id)}
    np.testing.assert_array_equal(lv[0], full[0, [pos[i] for i in ranked[0]]])
    with pytest.raises(KeyError):
        ranked_levels(np.array([[99]]), ["g1"], ["a/x"], d_group, d_cat)


# ----------------------------------------------------------------------------- report
def test_retrieval_report_groups_and_all_row():
    n_inst = np.array([2, 2])
    n_conc = np.array([3, 20])
    rep = retrieval_report(LEVELS, n_inst, n_conc, ks=(1, 5), groups=pd.Series(["noisy", "clean"]))
    assert list(rep.index) == ["all", "clean", "noisy"]
    assert list(rep.columns) == ["I-HR@1", "C-HR@1", "I-HR@5", "C-HR@5", "R@1", "R@5", "mAP@R", "NDCG@10",
                                 "n_queries"]
    assert rep.loc["all", "n_queries"] == 2 and rep.loc["noisy", "n_queries"] == 1
    # I-HR@1: A 0, B 1 -> all 50 %, noisy (A) 0, clean (B) 100
    assert rep.loc["all", "I-HR@1"] == pytest.approx(50.0)
    assert rep.loc["noisy", "I-HR@1"] == pytest.approx(0.0)
    assert rep.loc["clean", "I-HR@1"] == pytest.approx(100.0)
    # I-HR@5 (G = 2): A 1/2, B 1 -> 75 ; C-HR@5: A 2/3, B 4/5 -> mean 73.333
    assert rep.loc["all", "I-HR@5"] == pytest.approx(75.0)
    assert rep.loc["all", "C-HR@5"] == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    # mAP@R (R = 2): A [1, 0] -> (1/2)/2 = 0.25 ; B [0, 0] -> 1 -> 62.5
    assert rep.loc["all", "mAP@R"] == pytest.approx(62.5)
    assert 0 <= rep.loc["all", "NDCG@10"] <= 100


def test_retrieval_report_nan_aware_without_groups():
    # second query has no instance in the gallery: its I-HR / R / mAP are nan and skipped in the mean
    rep = retrieval_report(LEVELS, np.array([2, 0]), np.array([3, 20]), ks=(1,))
    assert list(rep.index) == ["all"]
    assert rep.loc["all", "I-HR@1"] == pytest.approx(0.0)   # only A counts (0)
    assert rep.loc["all", "R@1"] == pytest.approx(0.0)
    assert rep.loc["all", "C-HR@1"] == pytest.approx(100.0)  # A top-1 level 1, B top-1 level 0
    assert rep.loc["all", "n_queries"] == 2


# ----------------------------------------------------------------------------- thresholds
def test_precision_recall_f1_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pos = np.array([1, 0, 1, 1, 0], dtype=bool)
    # t = 0.7 -> predicted {0.9, 0.8, 0.7}: tp 2, fp 1 -> P = 2/3 ; R = 2/3 ; F1 = 2/3
    p, r, f = precision_recall_f1(scores, pos, 0.7)
    assert (p, r, f) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # t = 0.6 -> tp 3, fp 1 -> P = 3/4, R = 1, F1 = 2*0.75/(1.75) = 6/7
    assert precision_recall_f1(scores, pos, 0.6) == pytest.approx((0.75, 1.0, 6 / 7))
    # nothing predicted -> 0s
    assert precision_recall_f1(scores, pos, 1.0) == (0.0, 0.0, 0.0)


def test_best_f1_threshold_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pos = np.array([1, 0, 1, 1, 0], dtype=bool)
    # F1 by threshold: 0.9 -> P 1, R 1/3, F1 1/2 ; 0.8 -> 1/2 ; 0.7 -> 2/3 ; 0.6 -> 6/7 ; 0.5 -> P 3/5, R 1, 3/4
    t, p, r, f = best_f1_threshold(scores, pos)
    assert (t, p, r, f) == pytest.approx((0.6, 0.75, 1.0, 6 / 7))


def test_best_f1_threshold_brute_force():
    rng = np.random.default_rng(4)
    for trial in range(30):
        n = int(rng.integers(5, 60))
        pos = rng.random(n) < rng.uniform(0.1, 0.9)
        if not pos.any():
            continue
        scores = np.round(rng.normal(pos * 1.0, 1.0), 1)  # rounding creates ties
        brute = max(precision_recall_f1(scores, pos, t)[2] for t in np.unique(scores))
        t, p, r, f = best_f1_threshold(scores, pos)
        assert f == pytest.approx(brute)
        assert (p, r, f) == pytest.approx(precision_recall_f1(scores, pos, t))


def test_best_f1_threshold_no_positive():
    assert best_f1_threshold(np.array([0.1, 0.2]), np.array([False, False])) == (math.inf, 0.0, 0.0, 0.0)


def test_best_f1_threshold_tie_goes_to_highest_threshold():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    pos = np.array([1, 0, 0, 1], dtype=bool)
    # F1 = 2 tp / (n_pred + n_pos): t 0.9 -> 2/3 ; 0.8 -> 2/4 ; 0.7 -> 2/5 ; 0.6 -> 4/6 = 2/3 (tie)
    t, p, r, f = best_f1_threshold(scores, pos)
    assert (t, p, r, f) == pytest.approx((0.9, 1.0, 0.5, 2 / 3))


# ----------------------------------------------------------------------------- per-query / latency
def test_per_query_metrics_means_are_the_report_all_row():
    rng = np.random.default_rng(5)
    lv = rng.integers(0, 4, size=(50, 12))
    lv[:8][lv[:8] == 0] = 3                          # 8 queries without any instance -> nan I-HR / R / mAP
    # gallery counts consistent with the ranked lists (which are a subset of the gallery)
    n_inst = (lv == 0).sum(axis=1) + rng.integers(0, 3, size=50) * (np.arange(50) >= 8)
    n_conc = n_inst + (lv == 1).sum(axis=1) + rng.integers(0, 3, size=50)
    pq = per_query_metrics(lv, n_inst, n_conc, ks=(1, 5, 10))
    rep = retrieval_report(lv, n_inst, n_conc, ks=(1, 5, 10))
    assert len(pq) == 50 and list(pq.columns) == list(rep.columns.drop("n_queries"))
    vals = pq.to_numpy()
    assert np.all((vals[~np.isnan(vals)] >= 0) & (vals[~np.isnan(vals)] <= 1))
    assert pq["I-HR@1"].isna().sum() == (n_inst == 0).sum()
    np.testing.assert_allclose(pq.mean().to_numpy(), rep.loc["all"].drop("n_queries").to_numpy(dtype=float) / 100)
    # hand rows: LEVELS with n_inst [2, 2], n_conc [3, 20] -> I-HR@1 [0, 1], mAP@R [0.25, 1]
    hand = per_query_metrics(LEVELS, np.array([2, 2]), np.array([3, 20]), ks=(1,))
    np.testing.assert_allclose(hand["I-HR@1"], [0.0, 1.0])
    np.testing.assert_allclose(hand["mAP@R"], [0.25, 1.0])


def test_latency_summary_hand():
    # 1..10 ms; numpy linear percentiles: position (n-1)*q = 9q -> p50 = 1 + 4.5 = 5.5, p90 = 1 + 8.1 = 9.1,
    # p95 = 1 + 8.55 = 9.55, p99 = 1 + 8.91 = 9.91 ; mean 5.5 ; max 10
    out = latency_summary(np.arange(1, 11))
    assert out == pytest.approx({"n": 10, "mean": 5.5, "p50": 5.5, "p90": 9.1, "p95": 9.55, "p99": 9.91, "max": 10.0})
    assert isinstance(out["n"], int) and all(isinstance(v, float) for k, v in out.items() if k != "n")
    empty = latency_summary([])
    assert empty["n"] == 0 and all(math.isnan(v) for k, v in empty.items() if k != "n")
