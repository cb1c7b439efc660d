"""Post-hoc calibration of the instance-match probability (retrieval.calibration)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression

from retrieval.calibration import (Calibrator, calibration_report, expected_calibration_error,
                                    fit_calibrator, reliability)


# ----------------------------------------------------------------------------- ECE, reliability
def test_ece_hand_computed():
    # bins=2: [0, .5): probs .1 .2 (mean .15) vs labels 0 1 (.5): gap .35, weight .5
    #         [.5, 1]: probs .7 .9 (mean .8) vs labels 1 1 (1.): gap .2, weight .5
    p, y = [0.1, 0.2, 0.7, 0.9], [0, 1, 1, 1]
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.2)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0          # 1.0 lands in the last bin
    assert expected_calibration_error([1.0], [0]) == pytest.approx(1.0)
    assert expected_calibration_error([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    assert np.isnan(expected_calibration_error([], []))


def test_reliability_table():
    df = reliability([0.1, 0.2, 0.7, 0.9, 1.0], [0, 1, 1, 1, 0], bins=4)
    assert list(df.columns) == ["bin_lo", "bin_hi", "count", "mean_prob", "frac_pos"]
    assert df["bin_lo"].tolist() == [0.0, 0.5, 0.75]                      # empty bin [.25, .5) dropped
    assert df["count"].tolist() == [2, 1, 2]
    np.testing.assert_allclose(df["mean_prob"], [0.15, 0.7, 0.95])
    np.testing.assert_allclose(df["frac_pos"], [0.5, 1.0, 0.5])
    # ECE is the count-weighted mean gap of the table
    ece = (df["count"] * (df["frac_pos"] - df["mean_prob"]).abs()).sum() / df["count"].sum()
    assert expected_calibration_error([0.1, 0.2, 0.7, 0.9, 1.0], [0, 1, 1, 1, 0], bins=4) == pytest.approx(ece)


# ----------------------------------------------------------------------------- planted miscalibration
def _planted(distort, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(size=n)
    y = (rng.uniform(size=n) < p_true).astype(int)
    return distort(p_true), y


OVERCONFIDENT = lambda p: expit(3 * logit(p))  # noqa: E731


@pytest.mark.parametrize("kind, distort", [
    ("temperature", OVERCONFIDENT),
    ("isotonic", OVERCONFIDENT),
    ("isotonic", lambda p: p ** 3),
])
def test_fit_on_half_reduces_ece_on_other_half(kind, distort):
    prob, y = _planted(distort)
    half = len(prob) // 2
    cal = fit_calibrator(prob[:half], y[:half], kind=kind)
    assert cal.kind == kind
    rep = calibration_report(prob[half:], y[half:], cal)
    assert rep["n"] == len(prob) - half and rep["positives"] == int(y[half:].sum())
    assert rep["ece_before"] > 0.05
    assert rep["ece_after"] < 0.3 * rep["ece_before"]
    if kind == "temperature":
        assert cal.params["T"] == pytest.approx(3.0, rel=0.1)  # undoes logit * 3


def test_isotonic_apply_equals_sklearn_predict():
    rng = np.random.default_rng(1)
    prob = rng.uniform(0.2, 0.8, size=500)
    y = (rng.uniform(size=500) < prob ** 2).astype(int)
    cal = fit_calibrator(prob, y, kind="isotonic")
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(prob, y)
    grid = np.concatenate([np.linspace(0, 1, 1001), prob])  # includes points outside the fitted range
    np.testing.assert_allclose(cal(grid), iso.predict(grid), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["identity", "temperature", "isotonic"])
def test_json_round_trip(tmp_path, kind):
    prob, y = _planted(OVERCONFIDENT, n=2000, seed=2)
    cal = fit_calibrator(prob, y, kind=kind)
    path = tmp_path / "calibrator.json"
    cal.save(path)
    assert [f.name for f in tmp_path.iterdir()] == ["calibrator.json"]  # no temp file left behind
    json.loads(path.read_text())
    back = Calibrator.load(path)
    assert back.kind == kind
    grid = np.linspace(0, 1, 257)
    out = back(grid)
    assert out.dtype == np.float64 and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, cal(grid))
    assert Calibrator.from_dict(cal.to_dict()).to_dict() == cal.to_dict()


def test_temperature_handles_exact_zero_and_one():
    cal = Calibrator("temperature", {"T": 2.0})
    out = cal([0.0, 0.5, 1.0])
    assert np.all(np.isfinite(out)) and out[1] == pytest.approx(0.5)
    assert 0 <= out[0] < 0.01 and 0.99 < out[2] <= 1


# ----------------------------------------------------------------------------- degenerate, errors
@pytest.mark.parametrize("prob, label, why", [
    (np.linspace(0.1, 0.9, 5), [0, 1, 0, 1, 1], "samples"),
    (np.linspace(0, 1, 100), np.ones(100), "labels"),
    (np.linspace(0, 1, 100), np.zeros(100), "labels"),
])
@pytest.mark.parametrize("kind", ["temperature", "isotonic"])
def test_degenerate_inputs_give_identity(caplog, prob, label, why, kind):
    with caplog.at_level(logging.WARNING, logger="retrieval.calibration"):
        cal = fit_calibrator(prob, label, kind=kind)
    assert cal.kind == "identity"
    assert why in caplog.text
    np.testing.assert_array_equal(cal(prob), prob)


def test_bad_inputs_raise():
    p, y = np.linspace(0, 1, 20), np.arange(20) % 2
    with pytest.raises(ValueError, match="unknown calibrator kind"):
        fit_calibrator(p, y, kind="platt")
    with pytest.raises(ValueError, match="different lengths"):
        fit_calibrator(p, y[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_calibrator(p + 0.5, y)
    with pytest.raises(ValueError, match="NaN"):
        fit_calibrator(np.where(np.arange(20) == 3, np.nan, p), y)
    with pytest.raises(ValueError, match="binary"):
        fit_calibrator(p, y * 2)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(p, y, bins=0)
    with pytest.raises(ValueError, match="unknown calibrator kind"):
        Calibrator("platt")
    with pytest.raises(ValueError, match="missing params"):
        Calibrator.from_dict({"kind": "isotonic", "params": {"x": [0, 1]}})
    with pytest.raises(ValueError, match="T must be > 0"):
        Calibrator("temperature", {"T": 0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Calibrator("identity")([1.2])
