"""Lexical matching of a shopper's words against the catalog, and the hybrid merge with the dense
(embedding) candidates: what search does for a query that carries words.

Why a lexical side: shopper words are misspelt, reordered and partial copies of catalog titles;
a TF-IDF over word 1-2-grams and character 3-5-grams (typo-tolerant) matches them exactly, while
the embedding's own character n-gram term is a 576-d sketch shared with the image (BENCHMARKS.md
measures both). The merge keeps the embedding's order where the words say nothing.

    fused score = dense cosine + weight * TF-IDF cosine   (one weight with a photo, one without)

over the union of the dense top `serving.candidates` and the lexical top `lexical_candidates` (the
same depths in evaluation and in the service, whatever k a request asks for); a lexical candidate
the ANN search did not return gets the lowest dense score of those it did (a bound, not a guess).
The same functions serve evaluation (evaluation/retrieval.py) and the service (retrieval/pipeline.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _vectorizers():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return [TfidfVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)]


class LexicalIndex:
    """TF-IDF (word 1-2-grams + character 3-5-grams, halves weighted alike) over one document per
    item; `scores` are cosines in [0, 1]."""

    def __init__(self, item_ids, documents):
        from scipy.sparse import hstack

        self.ids = np.asarray(item_ids, dtype=object)
        if len(self.ids) != len(documents):
            raise ValueError(f"{len(self.ids)} item ids but {len(documents)} documents")
        docs = [str(d) if isinstance(d, str) else "" for d in documents]
        self.parts = _vectorizers()
        self.matrix = (hstack([p.fit_transform(docs) for p in self.parts]).tocsr() / np.sqrt(2)).T.tocsr()

    def scores(self, texts) -> np.ndarray:
        """[Q, items] float32 cosines (a query without words scores 0 everywhere)."""
        from scipy.sparse import hstack

        texts = [str(t) if isinstance(t, str) else "" for t in texts]
        q = hstack([p.transform(texts) for p in self.parts]).tocsr() / np.sqrt(2)
        return np.asarray((q @ self.matrix).toarray(), dtype=np.float32)

    def top(self, texts, k: int) -> tuple[np.ndarray, np.ndarray]:
        """([Q, k] item ids (None past the matches), [Q, k] cosines), best first; ties in item order."""
        return top_matches(self.scores(texts), self.ids, k)


def top_matches(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([Q, k] ids by descending score, None where the score is <= 0: nothing shared; [Q, k] scores).
    Ties keep the ids' order."""
    k = min(int(k), scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    return np.where(best > 0, np.asarray(ids, dtype=object)[order], None).astype(object), best


@dataclass(frozen=True)
class HybridConfig:
    weight: float = 0.0            # of the TF-IDF cosine beside the dense cosine, photo + words (0: dense order)
    text_only_weight: float = 0.0  # ... for words without a photo: they are all the evidence there is
    candidates: int = 100          # lexical candidates merged with the dense ones
    dense: int = 50                # dense candidates they merge into (serving.candidates)

    @classmethod
    def from_params(cls, params: dict) -> "HybridConfig":
        s = params.get("serving") or {}
        h = s.get("hybrid") or {}
        return cls(float(h.get("lexical_weight", 0.0)), float(h.get("text_only_weight", 0.0)),
                   int(h.get("lexical_candidates", 100)), int(s.get("candidates", 50)))

    def weight_for(self, has_image: bool) -> float:
        return self.weight if has_image else self.text_only_weight

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or self.text_only_weight > 0


def hybrid_merge(dense_ids, dense_scores, lex_ids, lex_scores, weight: float) -> tuple[list, list[float]]:
    """One query: (item ids, fused scores), best first. dense_*: the ANN candidates (distinct
    items, best first); lex_*: the lexical candidates (None ids and scores <= 0 ignored)."""
    dense = {i: float(s) for i, s in zip(dense_ids, dense_scores) if i is not None}
    lex = {i: float(s) for i, s in zip(lex_ids, lex_scores) if i is not None and s > 0}
    floor = min(dense.values()) if dense else 0.0
    fused = {i: dense.get(i, floor) + weight * lex.get(i, 0.0) for i in (*dense, *lex)}
    order = sorted(fused, key=lambda i: -fused[i])   # stable: dense order first among ties
    return order, [fused[i] for i in order]
