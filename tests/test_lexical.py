"""retrieval/lexical.py: the TF-IDF side of hybrid search and the merge with the dense candidates,
in evaluation (evaluation.retrieval.rank_hybrid) and in the service (Searcher)."""
import numpy as np
import pandas as pd
import pytest

from evaluation.retrieval import rank_hybrid
from retrieval.lexical import HybridConfig, LexicalIndex, hybrid_merge

DOCS = ["red leather handbag", "blue ceramic mug", "green garden chair", "wooden kitchen table",
        "silver wrist watch"]
IDS = [f"it{i}" for i in range(len(DOCS))]


def test_lexical_index_finds_misspelt_reordered_words():
    index = LexicalIndex(IDS, DOCS)
    ids, scores = index.top(["handbg red", "chiar garden", "mug blue", "zzzz"], 3)
    assert [r[0] for r in ids[:3]] == ["it0", "it2", "it1"]
    assert ids[3][0] is None and scores[3][0] == 0   # no shared n-gram: no match
    assert np.all(np.diff(scores, axis=1) <= 0) and scores.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="2 item ids but 5 documents"):
        LexicalIndex(IDS[:2], DOCS)


def test_merge_keeps_dense_order_without_words_and_lets_a_strong_match_in():
    dense_ids, dense_s = ["a", "b", "c"], [0.9, 0.8, 0.7]
    assert hybrid_merge(dense_ids, dense_s, [None], [0.0], 0.5) == (["a", "b", "c"], [0.9, 0.8, 0.7])
    order, fused = hybrid_merge(dense_ids, dense_s, ["c", "x"], [0.6, 0.5], 0.5)
    # c: 0.7 + 0.3; x, not a dense candidate, starts from the lowest dense score: 0.7 + 0.25
    assert order == ["c", "x", "a", "b"] and fused == pytest.approx([1.0, 0.95, 0.9, 0.8])
    order, _ = hybrid_merge(dense_ids, dense_s, ["x"], [1.0], 0.5)
    assert order[0] == "x"   # 0.7 + 0.5 beats 0.9


def test_rank_hybrid_changes_only_queries_with_words():
    rng = np.random.default_rng(0)
    g = pd.DataFrame({"item_id": IDS})
    g_emb = rng.standard_normal((len(IDS), 8)).astype(np.float32)
    g_emb /= np.linalg.norm(g_emb, axis=1, keepdims=True)
    q_emb = g_emb[[4]]   # every query looks like the watch
    q = pd.DataFrame({"image": [None, "photo.jpg", "photo.jpg", None],
                      "text": [None, "wooden table kitchen", "  ", "wooden table kitchen"]})
    index = LexicalIndex(IDS, DOCS)
    dense = rank_hybrid(q_emb[[0, 0, 0, 0]], q, g, g_emb, index, HybridConfig(), k=3)
    fused = rank_hybrid(q_emb[[0, 0, 0, 0]], q, g, g_emb, index, HybridConfig(weight=3.0, text_only_weight=0.0), k=3)
    assert [list(r) for r in dense[[0, 2, 3]]] == [list(r) for r in fused[[0, 2, 3]]]   # no words / no weight
    assert dense[1][0] == "it4" and fused[1][0] == "it3"
    text_only = rank_hybrid(q_emb[[0, 0, 0, 0]], q, g, g_emb, index, HybridConfig(text_only_weight=3.0), k=3)
    assert text_only[3][0] == "it3" and text_only[1][0] == "it4"
