"""Post-hoc calibration of an "instance match" probability, so "no exact match" can be thresholded.

A reranker's relevance probability is usually miscalibrated (often overconfident); a threshold on
it only means what it says after calibration. Fit on held-out (prob, label) pairs, measure with
the expected calibration error (ECE), store the fitted map as JSON next to the model.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

log = logging.getLogger(__name__)

KINDS = ("identity", "temperature", "isotonic")
EPS = 1e-7           # keeps logit finite for probabilities of exactly 0 or 1
T_BOUNDS = (0.05, 20.0)
MIN_SAMPLES = 10


def _prob(x, name: str = "prob") -> np.ndarray:
    p = np.asarray(x, dtype=np.float64)
    if np.isnan(p).any():
        raise ValueError(f"{name} contains NaN")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    return p


def _pair(prob, label) -> tuple[np.ndarray, np.ndarray]:
    p = _prob(prob).ravel()
    y = np.asarray(label, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"prob and label have different lengths ({p.size} vs {y.size})")
    if np.isnan(y).any() or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("label must be binary (0/1 or bool)")
    return p, y


def _bin_index(p: np.ndarray, bins: int) -> tuple[np.ndarray, int]:
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    bins = int(bins)
    return np.minimum((p * bins).astype(np.int64), bins - 1), bins  # last bin includes 1.0


def expected_calibration_error(prob, label, bins: int = 15) -> float:
    """Equal-width-bin ECE: sum_b |B|/n * |mean(label in B) - mean(prob in B)|; nan if empty."""
    p, y = _pair(prob, label)
    b, bins = _bin_index(p, bins)
    if p.size == 0:
        return float("nan")
    gap = np.abs(np.bincount(b, y, minlength=bins) - np.bincount(b, p, minlength=bins))
    return float(gap.sum() / p.size)  # |sum y - sum p| / n per bin == |B|/n * |mean gap|


def reliability(prob, label, bins: int = 15) -> pd.DataFrame:
    """Per non-empty bin: edges, count, mean predicted prob, observed positive fraction."""
    p, y = _pair(prob, label)
    b, bins = _bin_index(p, bins)
    count = np.bincount(b, minlength=bins)
    keep = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(b, p, minlength=bins) / count
        frac_pos = np.bincount(b, y, minlength=bins) / count
    lo = np.arange(bins) / bins
    return pd.DataFrame({"bin_lo": lo, "bin_hi": lo + 1 / bins, "count": count,
                         "mean_prob": mean_prob, "frac_pos": frac_pos})[keep].reset_index(drop=True)


def _temperature(p: np.ndarray, t: float) -> np.ndarray:
    return expit(logit(np.clip(p, EPS, 1 - EPS)) / t)


@dataclass
class Calibrator:
    """A fitted map prob -> calibrated prob. temperature: params {"T"}; isotonic: {"x", "y"}."""
    kind: str = "identity"
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown calibrator kind {self.kind!r}; expected one of {KINDS}")
        need = {"identity": (), "temperature": ("T",), "isotonic": ("x", "y")}[self.kind]
        missing = [k for k in need if k not in self.params]
        if missing:
            raise ValueError(f"{self.kind} calibrator is missing params {missing}")
        if self.kind == "temperature" and not float(self.params["T"]) > 0:
            raise ValueError(f"temperature T must be > 0, got {self.params['T']}")
        if self.kind == "isotonic" and (len(self.params["x"]) != len(self.params["y"]) or not len(self.params["x"])):
            raise ValueError("isotonic x and y must be non-empty and of equal length")

    def __call__(self, x) -> np.ndarray:
        p = _prob(x)
        if self.kind == "temperature":
            p = _temperature(p, float(self.params["T"]))
        elif self.kind == "isotonic":  # np.interp clamps outside [x0, xn] like out_of_bounds="clip"
            p = np.interp(p, np.asarray(self.params["x"], np.float64), np.asarray(self.params["y"], np.float64))
        return np.clip(p, 0.0, 1.0)

    def to_dict(self) -> dict:
        params = {k: (np.asarray(v, np.float64).tolist() if k in ("x", "y") else float(v))
                  for k, v in self.params.items()}
        return {"kind": self.kind, "params": params}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError("calibrator dict needs a 'kind' key")
        return cls(kind=d["kind"], params=dict(d.get("params", {})))

    def save(self, path) -> None:
        """Write JSON atomically: readers see the old file or the complete new one."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path) -> "Calibrator":
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_calibrator(prob, label, kind: str = "isotonic") -> Calibrator:
    """Fit a calibrator on held-out pairs; falls back to identity (with a warning) when the data
    cannot support a fit (fewer than 10 samples or only one label value)."""
    if kind not in KINDS:
        raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {KINDS}")
    p, y = _pair(prob, label)
    if kind == "identity":
        return Calibrator("identity")
    if p.size < MIN_SAMPLES:
        log.warning("calibration: only %d samples (< %d); using identity", p.size, MIN_SAMPLES)
        return Calibrator("identity")
    if np.unique(y).size < 2:
        log.warning("calibration: all %d labels are %d; using identity", p.size, int(y[0]))
        return Calibrator("identity")
    if kind == "temperature":
        z = logit(np.clip(p, EPS, 1 - EPS))

        def nll(log_t: float) -> float:  # mean binary NLL of sigmoid(z / T), computed stably
            zt = z / np.exp(log_t)
            return float(np.mean(np.logaddexp(0.0, zt) - y * zt))

        res = minimize_scalar(nll, bounds=tuple(np.log(T_BOUNDS)), method="bounded")
        return Calibrator("temperature", {"T": float(np.exp(res.x))})
    from sklearn.isotonic import IsotonicRegression
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(p, y)
    return Calibrator("isotonic", {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})


def calibration_report(prob, label, calibrator: Calibrator, bins: int = 15) -> dict:
    """ECE before and after applying ``calibrator`` (measure on data it was not fitted on)."""
    p, y = _pair(prob, label)
    return {"ece_before": expected_calibration_error(p, y, bins),
            "ece_after": expected_calibration_error(calibrator(p), y, bins),
            "n": int(p.size), "positives": int(y.sum())}
