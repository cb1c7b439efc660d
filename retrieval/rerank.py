"""Rerankers for the search pipeline's hook (retrieval/pipeline.Reranker) and for offline evaluation.

ChunkwiseReranker: the N candidates go into K = ceil(N/M) chunks (retrieval/merge.assign_chunks),
all K prompts of a query run as one batch, and retrieval/merge.merge turns the per-chunk scores into
one order (hybrid by default). PointwiseReranker: one prompt per candidate, all in one batch, sorted
by P(yes). With a fitted fusion (retrieval/fusion.py, fusion.json beside the checkpoint) either one
orders by its scores fused with the retrieval score instead. Both set Candidate.rerank_score and the
calibrated Candidate.p_instance.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.calibration import Calibrator
from core.io import read_json
from retrieval.fusion import FUSION_FILE, Fusion, features, fused_order
from retrieval.merge import assign_chunks, merge
from training.reranker import CALIBRATION_FILE, LIST, POINT, MLLMReranker

RERANK_ASSETS = {LIST: "reranker_model", POINT: "reranker_pointwise"}
INFERENCE_FILE = "inference.json"   # the reranker section a checkpoint was validated with
INFERENCE_KEYS = ("chunk_size", "assign", "merge", "batch_size_infer")


@dataclass
class Ranked:
    order: np.ndarray                 # candidate positions, best first
    score: np.ndarray                 # [N] the score the order came from (by position)
    p_instance: np.ndarray            # [N] calibrated P(instance match)
    concept: np.ndarray               # [N] P(level <= 1) where the model has it, else p_instance
    forward_passes: int
    extra: dict = field(default_factory=dict)


class _Base:
    mode = ""

    def __init__(self, model: MLLMReranker, calibrator: Calibrator | None = None, batch_size: int = 64,
                 fusion: Fusion | None = None, prefix_cache: bool = True):
        if model.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs a {self.mode!r} reranker, got {model.mode!r}")
        self.model, self.calibrator = model, calibrator or Calibrator("identity", {})
        self.batch_size, self.fusion = int(batch_size), fusion
        # a query's prompts share their prefix (system + query): compute it once per batch and reuse
        # its key/value cache (same scores; the model falls back where its family cannot)
        self.prefix_cache = bool(prefix_cache)
        self._local = threading.local()   # the service reranks on a thread pool: stats per thread

    @property
    def last_stats(self) -> dict:
        """This thread's last hook call: forward_passes, ms, and its parts prepare_ms (prompts and
        pixels), model_ms (forward passes), merge_ms (merge, fusion, calibration)."""
        return getattr(self._local, "stats", {})

    def rank_many(self, queries: Sequence[tuple], docs: Sequence[Sequence[tuple]],
                  first_stage: Sequence[Sequence[float]] | None = None, timing: dict | None = None) -> list[Ranked]:
        """Rank the docs of many queries; prompts of several queries share batches. With a fusion
        and the docs' retrieval scores (`first_stage`, by position), the order is the fused one."""
        rows_q, rows_d, spans, plans = [], [], [], []
        for q, d in zip(queries, docs):
            plan = self._plan(len(d))
            spans.append((len(rows_q), len(plan)))
            plans.append(plan)
            for positions in plan:
                rows_q.append(q)
                rows_d.append([d[i] for i in positions])
        scored = (self.model.score(rows_q, rows_d, batch_size=self.batch_size, prefix_cache=self.prefix_cache,
                                   timing=timing) if rows_q else [])
        ranked = [self._merge(plan, scored[a:a + n]) for plan, (a, n) in zip(plans, spans)]
        if self.fusion is None or first_stage is None:
            return ranked
        return [self._fuse(r, fs) for r, fs in zip(ranked, first_stage)]

    def rank(self, query: tuple, docs: Sequence[tuple], first_stage: Sequence[float] | None = None) -> Ranked:
        return self.rank_many([query], [docs], None if first_stage is None else [first_stage])[0]

    def _fuse(self, ranked: Ranked, first_stage: Sequence[float]) -> Ranked:
        prob = self.fusion.prob(features(np.asarray(first_stage), ranked.extra))
        return Ranked(fused_order(prob), prob, self.calibrator(prob), ranked.concept, ranked.forward_passes,
                      {**ranked.extra, "r_raw": prob, "unfused": ranked.extra["r_raw"]})

    def __call__(self, query, candidates: list) -> list:
        """The search pipeline's hook: Query + Candidates (with .image paths) -> reordered Candidates."""
        if not candidates:
            return candidates
        t0 = time.perf_counter()
        docs = [(c.image, c.title, None) if c.image else (None, c.title or c.item_id, None) for c in candidates]
        timing: dict = {}
        ranked = self.rank_many([(query.image, query.text, None)], [docs], [[c.score for c in candidates]], timing)[0]
        out = []
        for pos in ranked.order:
            c = candidates[int(pos)]
            c.rerank_score = round(float(ranked.score[pos]), 6)
            c.p_instance = round(float(ranked.p_instance[pos]), 6)
            out.append(c)
        ms = (time.perf_counter() - t0) * 1e3
        self._local.stats = {"forward_passes": ranked.forward_passes, "ms": ms, **timing,
                             "merge_ms": max(0.0, ms - sum(timing.values()))}
        return out


class ChunkwiseReranker(_Base):
    mode = LIST

    def __init__(self, model: MLLMReranker, calibrator: Calibrator | None = None, chunk_size: int = 10,
                 assign: str = "contiguous", merge_how: str = "hybrid", batch_size: int = 64,
                 fusion: Fusion | None = None, prefix_cache: bool = True):
        super().__init__(model, calibrator, batch_size, fusion, prefix_cache)
        if merge_how in ("r", "hybrid") and not model.absolute:
            raise ValueError(f"merge {merge_how!r} needs the absolute scorer; this reranker has none "
                             "(use merge 's' or 's_minus_null')")
        self.chunk_size, self.assign, self.merge_how = int(chunk_size), assign, merge_how
        assign_chunks(1, self.chunk_size, assign)   # validates both now, not at the first query

    def _plan(self, n: int) -> list[np.ndarray]:
        return assign_chunks(n, self.chunk_size, self.assign)

    def _merge(self, chunks: list[np.ndarray], rows: list[dict]) -> Ranked:
        n = sum(len(c) for c in chunks)
        s = [r["s"] for r in rows]
        s_null = np.array([r["s_null"] for r in rows])
        r = [r["r"] for r in rows] if self.model.absolute else None
        order = merge(chunks, s, r, s_null, how=self.merge_how)
        flat = lambda parts: self._scatter(chunks, parts, n)  # noqa: E731
        s_all, rel = flat(s), flat([x - sn for x, sn in zip(s, s_null)])
        if r is not None:
            raw = flat(r)
            concept = flat([row["levels"][:, :2].sum(1) for row in rows])
            score = raw
        else:   # no absolute scorer: the margin over the chunk's NULL is the only cross-chunk score
            raw = 1.0 / (1.0 + np.exp(-rel))
            concept, score = raw, s_all if self.merge_how == "s" else rel
        return Ranked(order, score, self.calibrator(raw), concept, len(chunks),
                      {"s": s_all, "s_minus_null": rel, "r_raw": raw})

    @staticmethod
    def _scatter(chunks, parts, n) -> np.ndarray:
        out = np.zeros(n)
        for c, p in zip(chunks, parts):
            out[c] = p
        return out


class PointwiseReranker(_Base):
    mode = POINT

    def _plan(self, n: int) -> list[np.ndarray]:
        return [np.array([i]) for i in range(n)]

    def _merge(self, plan, rows: list[dict]) -> Ranked:
        p = np.array([r["p_yes"] for r in rows])
        order = np.argsort(-p, kind="stable")
        return Ranked(order, p, self.calibrator(p), p, len(plan), {"r_raw": p})


def load_reranker(model_dir: str | Path, cfg: dict | None = None, mode: str | None = None,
                  merge_how: str | None = None, assign: str | None = None) -> _Base:
    """A reranker from a checkpoint directory (with its calibration.json when fitted) and the
    params' reranker section (chunk size, assignment, merge, batch size, image cache, prefix cache);
    keys cfg lacks (all of them for cfg=None, as in the registered pyfunc) come from the checkpoint's
    inference.json, the settings it was validated and calibrated with."""
    saved = Path(model_dir) / INFERENCE_FILE
    cfg = {**(read_json(saved) if saved.is_file() else {}), **(cfg or {})}
    missing = [k for k in INFERENCE_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{model_dir}: no {INFERENCE_FILE} and no {missing} given: cannot build the reranker")
    model = MLLMReranker.from_pretrained(model_dir, cache_mb=cfg.get("image_cache_mb", 0))
    if mode and model.mode != mode:
        raise ValueError(f"{model_dir} holds a {model.mode!r} reranker, not {mode!r}")
    cal_file, fusion_file = Path(model_dir) / CALIBRATION_FILE, Path(model_dir) / FUSION_FILE
    cal = Calibrator.load(cal_file) if cal_file.is_file() else None
    fusion = Fusion.load(fusion_file) if fusion_file.is_file() and cfg.get("fusion", True) else None
    prefix_cache = bool(cfg.get("prefix_cache", True))
    if model.mode == POINT:
        return PointwiseReranker(model, cal, batch_size=cfg["batch_size_infer"], fusion=fusion,
                                 prefix_cache=prefix_cache)
    how = merge_how or cfg["merge"]
    if not model.absolute and how in ("r", "hybrid"):
        how = "s_minus_null"   # a model trained without the absolute scorer has only s and s_null
    return ChunkwiseReranker(model, cal, cfg["chunk_size"], assign or cfg["assign"], how,
                             batch_size=cfg["batch_size_infer"], fusion=fusion, prefix_cache=prefix_cache)
