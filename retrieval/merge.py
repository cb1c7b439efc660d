"""Chunkwise listwise reranking: split candidates into chunks, merge per-chunk scores into one order.

A listwise reranker sees at most M candidates per forward pass, so the N retrieval candidates
(positions 0..N-1, best first) are split into K = ceil(N/M) chunks. Each pass yields local scores
``s`` (comparable only inside a chunk), optionally a NULL score per chunk, and per candidate an
absolute relevance probability ``r`` (comparable across chunks). ``merge`` turns them into one
final order of positions. Ties are always broken by retrieval position ascending, so results are
deterministic.
"""
from __future__ import annotations

import heapq

import numpy as np

ASSIGNMENTS = ("contiguous", "round_robin")
MERGES = ("s", "s_minus_null", "r", "hybrid")


def assign_chunks(n: int, m: int, how: str = "contiguous") -> list[np.ndarray]:
    """Candidate positions per chunk, ascending inside each chunk.

    contiguous: [0..m-1], [m..2m-1], ...  round_robin: position p goes to chunk p % K, so chunk
    sizes differ by at most one and every chunk gets one of the top-K retrieval candidates.
    """
    if how not in ASSIGNMENTS:
        raise ValueError(f"unknown chunk assignment {how!r}; expected one of {ASSIGNMENTS}")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    if int(m) != m or m < 1:
        raise ValueError(f"chunk size m must be a positive integer, got {m}")
    n, m = int(n), int(m)
    if n == 0:
        return []
    k = -(-n // m)
    if how == "contiguous":
        return [np.arange(i, min(i + m, n), dtype=np.int64) for i in range(0, n, m)]
    return [np.arange(c, n, k, dtype=np.int64) for c in range(k)]


def _flat(name: str, arrs, chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-chunk score arrays after checking they align with the chunks."""
    if len(arrs) != len(chunks):
        raise ValueError(f"{name} has {len(arrs)} chunks but chunks has {len(chunks)}")
    out = []
    for k, (a, c) in enumerate(zip(arrs, chunks)):
        a = np.asarray(a, dtype=np.float64)
        if a.shape != c.shape:
            raise ValueError(f"{name}[{k}] has shape {a.shape} but chunks[{k}] has shape {c.shape}")
        out.append(a)
    flat = np.concatenate(out) if out else np.empty(0)
    if np.isnan(flat).any():
        raise ValueError(f"{name} contains NaN")
    return flat


def _order(score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Indices sorting by score descending, ties by retrieval position ascending."""
    return np.lexsort((pos, -score))


def hybrid_merge(chunks: list[np.ndarray], s: list[np.ndarray], r: list[np.ndarray]) -> np.ndarray:
    """The paper's hybrid merge: the local ranking ``s`` decides the order inside a chunk, the
    absolute ``r`` decides which chunk's head goes next (K-way greedy merge). Order inside a chunk
    is never broken, so a chunk's head can hold back a higher-r item behind it."""
    sorted_chunks = []
    for c, sk, rk in zip(chunks, s, r):
        o = _order(np.asarray(sk, np.float64), c)
        sorted_chunks.append((c[o], np.asarray(rk, np.float64)[o]))
    heap = [(-rk[0], int(c[0]), k, 0) for k, (c, rk) in enumerate(sorted_chunks) if len(c)]
    heapq.heapify(heap)
    out = []
    while heap:
        _, p, k, i = heapq.heappop(heap)
        out.append(p)
        c, rk = sorted_chunks[k]
        if i + 1 < len(c):
            heapq.heappush(heap, (-rk[i + 1], int(c[i + 1]), k, i + 1))
    return np.asarray(out, dtype=np.int64)


def merge(chunks: list[np.ndarray], s: list[np.ndarray], r: list[np.ndarray] | None,
          s_null: np.ndarray | None = None, how: str = "hybrid") -> np.ndarray:
    """Final order (candidate positions, best first) from per-chunk scores.

    s: raw local scores sorted globally (the "chunkwise only" ablation; mixes scales across chunks).
    s_minus_null: s - s_null[k], the chunk's NULL score as a per-chunk anchor.
    r: absolute relevance probability sorted globally.  hybrid: see ``hybrid_merge``.
    """
    if how not in MERGES:
        raise ValueError(f"unknown merge {how!r}; expected one of {MERGES}")
    chunks = [np.asarray(c) for c in chunks]
    for k, c in enumerate(chunks):
        if c.ndim != 1 or (c.size and not np.issubdtype(c.dtype, np.integer)):
            raise ValueError(f"chunks[{k}] must be a 1-D integer array of positions")
    pos = np.concatenate(chunks).astype(np.int64) if chunks else np.empty(0, np.int64)
    if len(np.unique(pos)) != len(pos):
        raise ValueError("chunks contain a position more than once")
    s_flat = _flat("s", s, chunks)
    if how in ("r", "hybrid"):
        if r is None:
            raise ValueError(f"merge {how!r} needs r (absolute relevance probabilities)")
        r_flat = _flat("r", r, chunks)
    if how == "s":
        return pos[_order(s_flat, pos)]
    if how == "s_minus_null":
        if s_null is None:
            raise ValueError("merge 's_minus_null' needs s_null (one NULL score per chunk)")
        s_null = np.asarray(s_null, dtype=np.float64)
        if s_null.shape != (len(chunks),):
            raise ValueError(f"s_null must have one value per chunk ({len(chunks)}), got shape {s_null.shape}")
        if np.isnan(s_null).any():
            raise ValueError("s_null contains NaN")
        anchor = np.repeat(s_null, [len(c) for c in chunks])
        return pos[_order(s_flat - anchor, pos)]
    if how == "r":
        return pos[_order(r_flat, pos)]
    return hybrid_merge(chunks, s, r)
