"""evaluation.compare: paired bootstrap on planted differences and its coverage by simulation, the
per-metric table, Wilson / Newcombe intervals against hand formulas and published values."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from evaluation.compare import (
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    compare,
    paired_bootstrap,
    proportion_ci,
    two_proportion_test,
)
from evaluation.metrics import per_query_metrics


def _planted(n=400, seed=0):
    """control ~ Bernoulli(0.4); treatment = control with 10 % of its zeros flipped to one."""
    rng = np.random.default_rng(seed)
    control = (rng.random(n) < 0.4).astype(float)
    treatment = control.copy()
    zeros = np.flatnonzero(control == 0)
    treatment[rng.choice(zeros, size=round(0.1 * zeros.size), replace=False)] = 1.0
    return control, treatment


# ----------------------------------------------------------------------------- paired bootstrap
def test_planted_improvement_is_detected():
    c, t = _planted()
    r = paired_bootstrap(c, t, seed=0)
    true_diff = t.mean() - c.mean()            # ~ 0.06 (24 of ~240 zeros flipped)
    assert r["n"] == 400 and r["diff"] == pytest.approx(true_diff)
    assert r["control"] == pytest.approx(c.mean()) and r["treatment"] == pytest.approx(t.mean())
    assert r["ci_low"] <= true_diff <= r["ci_high"] and r["ci_low"] > 0
    assert r["significant"] and r["better"] and not r["worse"]
    assert r["p_value"] == pytest.approx(1 / 2000)   # no bootstrap diff <= 0 -> clipped at 1 / n_boot
    assert paired_bootstrap(c, t, seed=0) == r        # reproducible


def test_planted_worse_and_lower_is_better():
    c, t = _planted(seed=1)
    r = paired_bootstrap(t, c)                        # swapped arms: treatment loses
    assert r["diff"] < 0 and r["ci_high"] < 0 and r["worse"] and not r["better"]
    # the same drop on a lower-is-better metric (e.g. latency) is an improvement
    r2 = paired_bootstrap(t, c, higher_is_better=False)
    assert r2["better"] and not r2["worse"]


def test_identical_arms_not_significant():
    x = np.random.default_rng(2).random(300)
    r = paired_bootstrap(x, x.copy())
    assert r["diff"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0
    assert not r["significant"] and not r["better"] and not r["worse"] and r["p_value"] == 1.0


def test_nan_pairs_dropped_and_length_mismatch():
    c = np.array([0.0, 1.0, np.nan, 1.0, 0.0])
    t = np.array([1.0, 1.0, 1.0, np.nan, 1.0])
    r = paired_bootstrap(c, t, n_boot=200)
    # kept pairs: queries 0, 1, 4 -> control mean 1/3, treatment 1
    assert r["n"] == 3 and r["control"] == pytest.approx(1 / 3) and r["treatment"] == 1.0
    empty = paired_bootstrap([np.nan], [1.0])
    assert empty["n"] == 0 and math.isnan(empty["diff"]) and math.isnan(empty["p_value"])
    assert not empty["significant"] and not empty["better"] and not empty["worse"]
    with pytest.raises(ValueError):
        paired_bootstrap([0.0, 1.0], [1.0])


def test_chunked_resampling_matches_shape(monkeypatch):
    import evaluation.compare as cmp

    c, t = _planted(n=300, seed=3)
    monkeypatch.setattr(cmp, "_CHUNK_ELEMS", 1000)    # 3 resamples per chunk
    r = paired_bootstrap(c, t, n_boot=101)
    assert r["ci_low"] <= r["diff"] <= r["ci_high"] and r["significant"]


def test_coverage_of_known_difference():
    # 200 datasets, true mean difference 0.05 (per-query noise sd 0.3, n = 200): the 95 % percentile
    # interval should cover it in ~95 % of them (binomial sd ~1.5 pp)
    rng = np.random.default_rng(4)
    true, n_sim, n = 0.05, 200, 200
    control = rng.random((n_sim, n))
    treatment = control + true + rng.normal(0, 0.3, (n_sim, n))
    covered = [(r := paired_bootstrap(control[i], treatment[i], n_boot=500, seed=i))["ci_low"] <= true <= r["ci_high"]
               for i in range(n_sim)]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_mean_ci():
    x = np.r_[np.random.default_rng(5).normal(0.3, 0.1, 500), np.nan]
    m, lo, hi = bootstrap_mean_ci(x, n_boot=1000)
    assert m == pytest.approx(np.nanmean(x)) and lo < m < hi
    se = np.nanstd(x) / math.sqrt(500)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)  # ~ the normal interval
    assert all(math.isnan(v) for v in bootstrap_mean_ci([np.nan]))


def test_bootstrap_ratio_ci_pooled_value_and_coverage():
    # hand case: precision pooled over queries = (1 + 0 + 3) / (2 + 1 + 3), not the mean of per-query ratios
    v, lo, hi = bootstrap_ratio_ci([1, 0, 3], [2, 1, 3], n_boot=500)
    assert v == pytest.approx(4 / 6) and 0 <= lo <= v <= hi <= 1
    # a planted precision of 0.3: per query 5 to 15 predicted pairs, each right with p = 0.3;
    # the 95% interval covers 0.3 in about 95% of 200 replications
    hits = 0
    for rep in range(200):
        rng = np.random.default_rng(100 + rep)
        den = rng.integers(5, 16, size=150)
        v, lo, hi = bootstrap_ratio_ci(rng.binomial(den, 0.3), den, n_boot=400, seed=rep)
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 200 <= 0.99
    assert all(math.isnan(x) for x in bootstrap_ratio_ci([0, 0], [0, 0]))
    with pytest.raises(ValueError, match="different lengths"):
        bootstrap_ratio_ci([1], [1, 2])


# ----------------------------------------------------------------------------- compare()
def _frames():
    rng = np.random.default_rng(6)
    q = 120
    n_inst = rng.integers(1, 4, size=q)
    n_conc = n_inst + 2
    lv_c = rng.integers(0, 4, size=(q, 10))
    lv_t = lv_c.copy()
    lv_t[:, 0] = np.where(rng.random(q) < 0.3, 0, lv_t[:, 0])   # treatment puts more instances first
    ids = [f"q{i:03d}" for i in range(q)]
    c = per_query_metrics(lv_c, n_inst, n_conc, ks=(1, 5)).set_axis(ids)
    t = per_query_metrics(lv_t, n_inst, n_conc, ks=(1, 5)).set_axis(ids)
    return c, t


def test_compare_table_scaled_and_aligned():
    c, t = _frames()
    out = compare(c, t, n_boot=300)
    assert list(out.index) == list(c.columns) and out.index.name == "metric"
    r = paired_bootstrap(c["I-HR@1"], t["I-HR@1"], n_boot=300)
    row = out.loc["I-HR@1"]
    for k in ("control", "treatment", "diff", "ci_low", "ci_high"):
        assert row[k] == pytest.approx(100 * r[k])
    assert row["n"] == r["n"] == 120 and row["p_value"] == r["p_value"] and row["better"]
    # row order does not matter: shuffle both frames
    shuffled = compare(c.sample(frac=1, random_state=0), t.sample(frac=1, random_state=1), n_boot=300)
    pd.testing.assert_frame_equal(out, shuffled)
    # only the common query ids are used
    part = compare(c, t.iloc[:80], metrics=["I-HR@1", "mAP@R"], lower_is_better=["mAP@R"], n_boot=300)
    assert list(part.index) == ["I-HR@1", "mAP@R"] and (part["n"] == 80).all()
    assert not part.loc["mAP@R", "better"]  # mAP@R went up but is declared lower-is-better
    with pytest.raises(ValueError):
        compare(c, t.set_axis([f"x{i}" for i in range(len(t))]))


# ----------------------------------------------------------------------------- proportions
def _wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(81, 263), (3, 40), (0, 10), (10, 10)])
def test_proportion_ci_is_wilson(k, n):
    p, lo, hi = proportion_ci(k, n)
    assert p == pytest.approx(k / n)
    assert (lo, hi) == pytest.approx(_wilson(k, n), abs=1e-9)
    assert all(math.isnan(v) for v in proportion_ci(0, 0))


def test_proportion_ci_known_value():
    # 0 / 10: Wilson upper = z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.27753
    assert proportion_ci(0, 10)[2] == pytest.approx(0.27753, abs=1e-5)


def test_two_proportion_newcombe_published_example():
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 vs 48/80, diff 0.2, method 10 CI 0.0524 to 0.3339
    r = two_proportion_test(48, 80, 56, 70)
    assert r["diff"] == pytest.approx(0.2) and r["ci_method"] == "newcombe"
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_two_proportion_planted():
    # CTR 10 % vs 11.5 % on 10k impressions each: pooled p = 0.1075,
    # se = sqrt(0.1075 * 0.8925 * 2 / 10000) = 0.0043805 -> z = 0.015 / 0.0043805 = 3.424
    r = two_proportion_test(1000, 10_000, 1150, 10_000)
    assert r["z"] == pytest.approx(3.424, abs=1e-3)
    assert r["p_value"] == pytest.approx(6.2e-4, rel=0.05) and r["significant"]
    assert 0 < r["ci_low"] < 0.015 < r["ci_high"]
    null = two_proportion_test(1000, 10_000, 1010, 10_000)
    assert not null["significant"] and null["ci_low"] < 0 < null["ci_high"]
    same = two_proportion_test(0, 50, 0, 60)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and not same["significant"]
    assert math.isnan(two_proportion_test(0, 0, 1, 10)["diff"])
