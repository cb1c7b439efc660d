"""Chunk assignment and score merging for the chunkwise listwise reranker (retrieval.merge)."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.merge import ASSIGNMENTS, MERGES, assign_chunks, hybrid_merge, merge


def _lists(chunks):
    return [c.tolist() for c in chunks]


# ----------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("n, m, how, expected", [
    (7, 3, "contiguous", [[0, 1, 2], [3, 4, 5], [6]]),
    (7, 3, "round_robin", [[0, 3, 6], [1, 4], [2, 5]]),
    (5, 2, "round_robin", [[0, 3], [1, 4], [2]]),
    (4, 3, "round_robin", [[0, 2], [1, 3]]),
    (6, 3, "contiguous", [[0, 1, 2], [3, 4, 5]]),
    (3, 10, "contiguous", [[0, 1, 2]]),
    (3, 10, "round_robin", [[0, 1, 2]]),
    (3, 1, "round_robin", [[0], [1], [2]]),
    (0, 4, "contiguous", []),
    (0, 4, "round_robin", []),
])
def test_assign_chunks_planted(n, m, how, expected):
    assert _lists(assign_chunks(n, m, how)) == expected


@pytest.mark.parametrize("how", ASSIGNMENTS)
def test_assign_chunks_properties(how):
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, m = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        chunks = assign_chunks(n, m, how)
        assert len(chunks) == -(-n // m)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(n))
        sizes = [len(c) for c in chunks]
        assert max(sizes) <= m and min(sizes) >= 1
        assert all(np.all(np.diff(c) > 0) for c in chunks)
        if how == "round_robin":
            assert max(sizes) - min(sizes) <= 1
            assert sorted(c[0] for c in chunks) == list(range(len(chunks)))  # each gets a top-K item


def test_assign_chunks_errors():
    with pytest.raises(ValueError, match="chunk size"):
        assign_chunks(5, 0)
    with pytest.raises(ValueError, match="unknown chunk assignment"):
        assign_chunks(5, 2, "random")
    with pytest.raises(ValueError, match="non-negative"):
        assign_chunks(-1, 2)


# ----------------------------------------------------------------------------- merge, planted
CHUNKS = [np.array([0, 1, 2]), np.array([3, 4, 5])]
S = [np.array([0.1, 0.9, 0.5]), np.array([5.0, 4.0, 6.0])]
R = [np.array([0.2, 0.8, 0.6]), np.array([0.7, 0.1, 0.3])]
S_NULL = np.array([0.0, 5.0])


@pytest.mark.parametrize("how, expected", [
    ("s", [5, 3, 4, 1, 2, 0]),             # chunk 1's larger raw scale wins everything
    ("s_minus_null", [5, 1, 2, 0, 3, 4]),  # s - null: 0.1 .9 .5 | 0 -1 1
    ("r", [1, 3, 2, 5, 0, 4]),
    # chunk orders by s: [1, 2, 0] (r .8 .6 .2) and [5, 3, 4] (r .3 .7 .1); item 3 (r .7)
    # waits behind its chunk head 5 (r .3), which only goes after 1 and 2
    ("hybrid", [1, 2, 5, 3, 0, 4]),
])
def test_merge_planted(how, expected):
    assert merge(CHUNKS, S, R, S_NULL, how=how).tolist() == expected


@pytest.mark.parametrize("how", MERGES)
def test_merge_ties_by_retrieval_position(how):
    chunks = assign_chunks(5, 2, "round_robin")  # [0, 3], [1, 4], [2]
    flat = [np.zeros(len(c)) for c in chunks]
    out = merge(chunks, flat, flat, np.zeros(len(chunks)), how=how)
    assert out.tolist() == [0, 1, 2, 3, 4]


def test_merge_empty():
    for how in MERGES:
        assert merge([], [], [], np.zeros(0), how=how).tolist() == []


# ----------------------------------------------------------------------------- hybrid vs brute force
def _hybrid_reference(chunks, s, r):
    """Sort every chunk by (-s, position); repeatedly scan all heads for the best (-r, position)."""
    queues = [sorted(zip(c.tolist(), sk.tolist(), rk.tolist()), key=lambda t: (-t[1], t[0]))
              for c, sk, rk in zip(chunks, s, r)]
    out = []
    while any(queues):
        k = min((k for k, q in enumerate(queues) if q), key=lambda k: (-queues[k][0][2], queues[k][0][0]))
        out.append(queues[k].pop(0)[0])
    return out


def _random_case(rng):
    n, m = int(rng.integers(0, 40)), int(rng.integers(1, 10))
    chunks = assign_chunks(n, m, ASSIGNMENTS[int(rng.integers(2))])
    levels = int(rng.integers(2, 6))  # few distinct values -> many ties
    s = [rng.integers(0, levels, len(c)) / levels + rng.normal() * 3 for c in chunks]  # per-chunk offset
    r = [rng.integers(0, levels, len(c)) / levels for c in chunks]
    return n, chunks, s, r


def test_hybrid_matches_brute_force():
    for seed in range(300):
        n, chunks, s, r = _random_case(np.random.default_rng(seed))
        out = merge(chunks, s, r, how="hybrid")
        assert out.tolist() == _hybrid_reference(chunks, s, r), seed
        assert hybrid_merge(chunks, s, r).tolist() == out.tolist()


def test_hybrid_never_reorders_within_chunk():
    for seed in range(200):
        n, chunks, s, r = _random_case(np.random.default_rng(1000 + seed))
        rank = np.empty(n, dtype=np.int64)
        rank[merge(chunks, s, r, how="hybrid")] = np.arange(n)
        for c, sk in zip(chunks, s):
            local = c[np.lexsort((c, -sk))]  # chunk order by local s, ties by position
            assert np.all(np.diff(rank[local]) > 0), seed


@pytest.mark.parametrize("how", MERGES)
def test_merge_is_permutation(how):
    for seed in range(100):
        rng = np.random.default_rng(2000 + seed)
        n, chunks, s, r = _random_case(rng)
        out = merge(chunks, s, r, rng.normal(size=len(chunks)), how=how)
        assert out.dtype.kind == "i" and sorted(out.tolist()) == list(range(n))


def test_global_sorts_match_reference():
    rng = np.random.default_rng(7)
    n, chunks, s, r = _random_case(rng)
    while n < 10:
        n, chunks, s, r = _random_case(rng)
    null = rng.normal(size=len(chunks))
    pos = np.concatenate(chunks).tolist()
    flat = lambda a: np.concatenate(a).tolist()
    adj = flat([sk - nk for sk, nk in zip(s, null)])
    for how, score in (("s", flat(s)), ("r", flat(r)), ("s_minus_null", adj)):
        expected = [p for _, p in sorted(zip(score, pos), key=lambda t: (-t[0], t[1]))]
        assert merge(chunks, s, r, null, how=how).tolist() == expected


# ----------------------------------------------------------------------------- errors
def test_merge_errors():
    with pytest.raises(ValueError, match="unknown merge"):
        merge(CHUNKS, S, R, how="borda")
    with pytest.raises(ValueError, match="needs r"):
        merge(CHUNKS, S, None, how="hybrid")
    with pytest.raises(ValueError, match="needs r"):
        merge(CHUNKS, S, None, how="r")
    assert merge(CHUNKS, S, None, how="s").tolist() == [5, 3, 4, 1, 2, 0]  # s needs no r
    with pytest.raises(ValueError, match="needs s_null"):
        merge(CHUNKS, S, R, how="s_minus_null")
    with pytest.raises(ValueError, match="one value per chunk"):
        merge(CHUNKS, S, R, np.zeros(3), how="s_minus_null")
    with pytest.raises(ValueError, match=r"s\[1\] has shape"):
        merge(CHUNKS, [S[0], S[1][:2]], R)
    with pytest.raises(ValueError, match=r"r\[0\] has shape"):
        merge(CHUNKS, S, [R[0][:1], R[1]])
    with pytest.raises(ValueError, match="s has 1 chunks"):
        merge(CHUNKS, S[:1], R)
    with pytest.raises(ValueError, match="more than once"):
        merge([np.array([0, 1]), np.array([1, 2])], [np.zeros(2)] * 2, [np.zeros(2)] * 2)
    with pytest.raises(ValueError, match="NaN"):
        merge(CHUNKS, [np.array([0.1, np.nan, 0.5]), S[1]], R)
    with pytest.raises(ValueError, match="integer"):
        merge([np.array([0.5, 1.0])], [np.zeros(2)], [np.zeros(2)])
