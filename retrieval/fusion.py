"""The first-stage similarity fused with the reranker's scores (beyond the paper: its hybrid merge
ignores the retrieval score; fusing it is standard learning-to-rank practice).

A logistic regression, fit on validation candidates, maps per-candidate features to P(instance):
the retrieval score, its gap to the query's best retrieval score, and the reranker's own scores
(logit of the absolute r and s - s_null for listwise, logit P(yes) for pointwise). The final order
sorts by that probability, ties by retrieval position. Where the reranker's scores carry nothing
the fit weights them near 0 and the order is retrieval's: an uninformed reranker cannot sink it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.io import read_json, write_json

FUSION_FILE = "fusion.json"
EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def features(first_stage: np.ndarray, extra: dict) -> dict[str, np.ndarray]:
    """Per candidate of one query (by retrieval position): the named fusion inputs. `extra` is a
    Ranked.extra (r_raw; s_minus_null for listwise)."""
    fs = np.asarray(first_stage, np.float64)
    out = {"first_stage": fs, "first_stage_gap": fs - fs.max() if len(fs) else fs,
           "rerank_logit": logit(extra["r_raw"])}
    if "s_minus_null" in extra:
        out["s_minus_null"] = np.asarray(extra["s_minus_null"], np.float64)
    return out


@dataclass
class Fusion:
    names: list[str]
    coef: list[float]
    intercept: float
    mean: list[float]
    scale: list[float]

    def matrix(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise ValueError(f"fusion needs features {missing}; the reranker gave {sorted(feats)}")
        x = np.stack([feats[n] for n in self.names], -1)
        return (x - np.asarray(self.mean)) / np.asarray(self.scale)

    def prob(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        z = self.matrix(feats) @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def fit(cls, feats: dict[str, np.ndarray], positive: np.ndarray, c: float = 1.0) -> "Fusion":
        """feats: name -> [n] over every validation (query, candidate) pair; positive: instance match."""
        from sklearn.linear_model import LogisticRegression

        names = sorted(feats)
        x = np.stack([feats[n] for n in names], -1)
        positive = np.asarray(positive, bool)
        if positive.all() or not positive.any():
            raise ValueError(f"fusion needs positive and negative validation pairs, got {int(positive.sum())} of {len(positive)}")
        mean, scale = x.mean(0), x.std(0) + EPS
        lr = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / scale, positive)
        return cls(names, lr.coef_[0].tolist(), float(lr.intercept_[0]), mean.tolist(), scale.tolist())

    def save(self, path: str | Path) -> None:
        write_json(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> "Fusion":
        return cls(**read_json(path))


def fused_order(prob: np.ndarray) -> np.ndarray:
    """Positions by fused probability descending, ties by retrieval position."""
    return np.lexsort((np.arange(len(prob)), -np.asarray(prob)))
