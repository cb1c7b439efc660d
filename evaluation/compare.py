"""Control-vs-treatment comparisons with confidence intervals.

Offline: both systems are scored on the *same* queries (``evaluation.metrics.per_query_metrics``), so
the comparison is paired. Resampling queries and recomputing the mean difference (a paired bootstrap)
keeps the per-query correlation between the arms, which gives much tighter and still honest
intervals than comparing two independent means; it also makes no normality assumption, which
matters for bounded, lumpy metrics such as I-HR@1 (0/1 per query). Online click-through, where each
arm sees different traffic, is compared as two independent proportions instead.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binomtest, norm

_CHUNK_ELEMS = 4_000_000  # index-matrix elements per bootstrap chunk (~32 MB of int64)
_SCALED = ("control", "treatment", "diff", "ci_low", "ci_high")


def _resamples(n: int, n_boot: int, seed: int):
    """(slice of the n_boot resamples, [rows, n] indices drawn with replacement), in chunks so that
    a large n * n_boot index matrix never has to sit in memory at once."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        yield slice(start, stop), rng.integers(0, n, (stop - start, n))


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of x."""
    out = np.empty(n_boot)
    for rows, idx in _resamples(x.size, n_boot, seed):
        out[rows] = x[idx].mean(axis=1)
    return out


def paired_bootstrap(control, treatment, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                     higher_is_better: bool = True) -> dict:
    """Paired bootstrap of mean(treatment) - mean(control) over per-query values aligned by query.

    Pairs where either arm is nan (metric undefined for that query) are dropped, so both means are
    over the same ``n`` queries. Queries are resampled with replacement; as the statistic is linear,
    resampling the per-query differences is the same as resampling the pairs.
    Returns n, control, treatment (means), diff, ci_low / ci_high (percentile interval at 1 - alpha),
    p_value, significant (CI excludes 0), better / worse (significant, and diff in the better /
    worse direction given ``higher_is_better``).
    p_value is the bootstrap two-sided value 2 * min(P(d* <= 0), P(d* >= 0)) over the bootstrap
    diffs d*, clipped to [1 / n_boot, 1]: a bootstrap cannot resolve anything smaller than
    1 / n_boot, so it is not reported as 0. n == 0 gives nan numbers and False flags."""
    c = np.asarray(control, dtype=np.float64).reshape(-1)
    t = np.asarray(treatment, dtype=np.float64).reshape(-1)
    if c.shape != t.shape:
        raise ValueError(f"control and treatment must be aligned per query, got {c.size} vs {t.size}")
    keep = ~(np.isnan(c) | np.isnan(t))
    c, t = c[keep], t[keep]
    n = int(c.size)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "control": nan, "treatment": nan, "diff": nan, "ci_low": nan, "ci_high": nan,
                "p_value": nan, "significant": False, "better": False, "worse": False}
    d = t - c
    diff = float(d.mean())
    boot = _boot_means(d, n_boot, seed)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p = 2 * min(np.mean(boot <= 0), np.mean(boot >= 0))
    significant = bool(lo > 0 or hi < 0)
    improved = diff > 0 if higher_is_better else diff < 0
    return {"n": n, "control": float(c.mean()), "treatment": float(t.mean()), "diff": diff,
            "ci_low": float(lo), "ci_high": float(hi), "p_value": float(np.clip(p, 1 / n_boot, 1.0)),
            "significant": significant, "better": significant and bool(improved),
            "worse": significant and bool(diff != 0 and not improved)}


def compare(control: pd.DataFrame, treatment: pd.DataFrame, metrics: list[str] | None = None,
            lower_is_better=(), scale: float = 100.0, **bootstrap_kw) -> pd.DataFrame:
    """One row per metric (index ``metric``) with the ``paired_bootstrap`` fields.

    Both frames hold per-query values indexed by query id; they are aligned on the common ids (sorted,
    so the result does not depend on row order), which must be non-empty and unique. ``metrics``
    defaults to the numeric columns both frames share (control's order). Metrics named in
    ``lower_is_better`` (e.g. latency) flip better / worse. Means, diff and CI are multiplied by
    ``scale`` (per-query values in [0, 1] -> percentage points); n, p_value and flags are not. Every
    metric uses the same seed (``bootstrap_kw``), so reruns reproduce the table exactly."""
    for name, df in (("control", control), ("treatment", treatment)):
        if not df.index.is_unique:
            raise ValueError(f"{name} has duplicated query ids")
    common = control.index.intersection(treatment.index)
    if len(common) == 0:
        raise ValueError("control and treatment share no query ids")
    try:
        common = common.sort_values()
    except TypeError:
        common = pd.Index(sorted(common, key=str))
    if metrics is None:
        num_t = set(treatment.select_dtypes("number").columns)
        metrics = [m for m in control.select_dtypes("number").columns if m in num_t]
    lower = set(lower_is_better)
    rows = {}
    for m in metrics:
        r = paired_bootstrap(control.loc[common, m].to_numpy(dtype=np.float64),
                             treatment.loc[common, m].to_numpy(dtype=np.float64),
                             higher_is_better=m not in lower, **bootstrap_kw)
        rows[m] = {k: (v * scale if k in _SCALED else v) for k, v in r.items()}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "metric"
    return out


def bootstrap_mean_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): one arm's nan-aware mean with a percentile bootstrap interval, for reporting an
    absolute level next to a paired difference. No values -> (nan, nan, nan)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = np.quantile(_boot_means(x, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def bootstrap_ratio_ci(num, den, n_boot: int = 2000, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float, float]:
    """(sum num / sum den, lo, hi) with a percentile bootstrap over units (queries), for pooled
    ratios whose pairs are clustered by query: precision = TP / predicted, recall = TP / positives,
    F1 = 2 TP / (predicted + positives). A resample with den 0 counts as ratio 0 (as
    precision_recall_f1 does). No units or sum den == 0 -> (nan, nan, nan)."""
    a = np.asarray(num, dtype=np.float64).reshape(-1)
    b = np.asarray(den, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"num and den have different lengths ({a.size} vs {b.size})")
    if a.size == 0 or b.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    out = np.empty(n_boot)
    for rows, idx in _resamples(a.size, n_boot, seed):
        sa, sb = a[idx].sum(axis=1), b[idx].sum(axis=1)
        out[rows] = np.divide(sa, sb, out=np.zeros_like(sa), where=sb > 0)
    lo, hi = np.quantile(out, [alpha / 2, 1 - alpha / 2])
    return float(a.sum() / b.sum()), float(lo), float(hi)


def percent_ci(value: float, lo: float, hi: float) -> dict:
    """A fraction and its interval as the report's record: {value, ci_low, ci_high} in percent."""
    return {"value": 100 * value, "ci_low": 100 * lo, "ci_high": 100 * hi}


def proportion_ci(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """(p, lo, hi) with the Wilson score interval, which, unlike the Wald interval, stays inside [0, 1]
    and keeps near-nominal coverage for small counts and CTRs near 0. trials == 0 -> nans."""
    if trials == 0:
        return float("nan"), float("nan"), float("nan")
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return successes / trials, float(ci.low), float(ci.high)


def two_proportion_test(s1: int, n1: int, s2: int, n2: int, alpha: float = 0.05) -> dict:
    """Online A/B on click-through: arm 1 (control) s1 clicks of n1 impressions, arm 2 (treatment).

    diff = p2 - p1 with Newcombe's hybrid score interval (method 10: combines the two Wilson
    intervals; better coverage than Wald's p +- z*se for small or extreme rates). p_value: two-sided
    pooled z test, z = diff / sqrt(p(1-p)(1/n1 + 1/n2)) with p the pooled rate; significant:
    p_value < alpha (the Newcombe CI and the z test agree except at the margin). Either arm empty ->
    nans, significant False."""
    nan = float("nan")
    if n1 == 0 or n2 == 0:
        return {"n1": int(n1), "n2": int(n2), "p1": nan, "p2": nan, "diff": nan, "ci_low": nan, "ci_high": nan, "z": nan,
                "p_value": nan, "significant": False, "ci_method": "newcombe"}
    p1, l1, u1 = proportion_ci(s1, n1, alpha)
    p2, l2, u2 = proportion_ci(s2, n2, alpha)
    diff = p2 - p1
    lo = diff - np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    hi = diff + np.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    pool = (s1 + s2) / (n1 + n2)
    se = np.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    z = diff / se if se > 0 else 0.0  # se == 0: both arms all-0 or all-1, so diff == 0 too
    p_value = float(2 * norm.sf(abs(z)))
    return {"n1": int(n1), "n2": int(n2), "p1": p1, "p2": p2, "diff": diff, "ci_low": float(lo), "ci_high": float(hi), "z": float(z),
            "p_value": p_value, "significant": p_value < alpha, "ci_method": "newcombe"}
