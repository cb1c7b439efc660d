"""The reranker's data, start and merge (issue "A reranker that makes the ranking better"): each
test fails on the code before the fix. Slots are shuffled so the listwise head cannot learn the
slot; no positive comes from outside what retrieval returns; yes / no start apart; pointwise
batches hold positives; a fusion with an uninformative reranker keeps retrieval's order."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pailitao.stages import reranking as rs
from retrieval.fusion import Fusion, features, fused_order
from tests.test_reranker import embedder_dir  # noqa: F401  (module fixture: a tiny embedder checkpoint)
from training import rerank_data as rd
from training.reranker import LIST, NO_TOKEN, POINT, YES_TOKEN, MLLMReranker


def _cands(n_queries=200, n=50, hit_rank=0, seed=0) -> pd.DataFrame:
    """Retrieval lists whose instance (level 0) sits at `hit_rank` (None: not retrieved)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        for r in range(n):
            level = 0 if r == hit_rank else int(rng.choice([1, 2, 3], p=[0.1, 0.2, 0.7]))
            rows.append((f"q{q:03d}", r, f"i{q}-{r}", f"im{q}-{r}", 1.0 - r / n, level))
    return pd.DataFrame(rows, columns=["query_id", "rank", "item_id", "image_id", "score", "level"])


def test_training_positives_are_not_in_slot_zero_by_retrieval_order():
    chunks = rd.training_chunks(_cands(), m=10, instance_share=1.0, seed=0)
    pos = chunks[chunks["level"] == 0]
    assert len(pos) == 200                       # every chunk holds its (retrieved) instance
    assert rs.slot0_share(chunks) < 0.2          # in retrieval order: 1.0 (rank 0 -> slot 0)
    assert set(pos["slot"]) == set(range(10))    # the instance is seen in every slot


def test_no_positive_from_outside_what_retrieval_returns():
    """A query whose instance retrieval missed gets no planted positive unless it is a near miss
    (retrieved just past the top-N), and that one keeps its real rank."""
    missed = _cands(n_queries=20, hit_rank=None)
    near = pd.DataFrame({"query_id": ["q003"], "rank": [57], "item_id": ["near"], "image_id": ["im-near"],
                         "score": [0.1], "level": [0]})
    chunks = rd.training_chunks(missed, m=10, instance_share=1.0, seed=0, positives=near)
    pos = chunks[chunks["level"] == 0]
    assert pos["query_id"].tolist() == ["q003"] and pos["rank"].tolist() == [57]
    assert (chunks[chunks["query_id"] != "q003"]["level"] > 0).all()


def test_yes_and_no_start_apart(embedder_dir):  # noqa: F811
    """Identical yes / no rows gave P(yes) = 0.5 for every pair at the start and no gradient to
    separate them; each answer token now starts from its word."""
    model = MLLMReranker.from_embedder(embedder_dir, mode=POINT, scorer_hidden=16)
    head = model.lm.lm_head.weight
    yes, no = head[model.tokenizer.convert_tokens_to_ids(YES_TOKEN)], head[model.tokenizer.convert_tokens_to_ids(NO_TOKEN)]
    assert torch.cosine_similarity(yes, no, dim=0) < 0.99
    idx = head[model.index_ids]
    assert torch.cdist(idx, idx).fill_diagonal_(1.0).min() > 0   # index tokens differ from each other


def test_pointwise_batches_hold_the_configured_share_of_positives():
    chunks = rd.training_chunks(_cands(n_queries=60), m=10, instance_share=0.5, seed=0)
    data = rd.RerankSet.__new__(rd.RerankSet)   # only .samples and .mode are read by the sampler
    data.mode = "point"
    data.samples = [r.to_frame().T for _, r in chunks.iterrows()]
    drawn = list(rd.train_sampler(data, 0.5, seed=0))
    share = np.mean([int(data.samples[i]["level"].iloc[0]) == 0 for i in drawn])
    plain = np.mean([int(s["level"].iloc[0]) == 0 for s in data.samples])
    assert plain < 0.1 and 0.4 < share < 0.6


def _runs(n_queries, informative, seed):
    """Rows of a run_reranker result for n_queries x 20 candidates: retrieval puts the instance first
    60% of the time; the reranker's r is noise, or (informative) high on the instance."""
    rng = np.random.default_rng(seed)
    lv = np.full((n_queries, 20), 3)
    hit = np.where(rng.random(n_queries) < 0.6, 0, rng.integers(1, 20, n_queries))
    lv[np.arange(n_queries), hit] = 0
    first = np.sort(rng.normal(0.6, 0.05, (n_queries, 20)), axis=1)[:, ::-1]
    r = rng.random((n_queries, 20))
    if informative:
        r = np.where(lv == 0, 0.5 + 0.5 * r, 0.6 * r)
    return {"levels_by_rank": lv, "levels": lv.copy(), "items_by_rank": np.arange(n_queries * 20).reshape(n_queries, 20).astype(object),
            "items": np.zeros((n_queries, 20), object), "first_stage": first, "unfused": r,
            "s_minus_null": np.full((n_queries, 20), np.nan), "p_raw": r.copy(), "p_instance": r.copy()}


@pytest.mark.parametrize("informative", [False, True])
def test_fusion_keeps_retrieval_order_from_an_uninformed_reranker(informative):
    val, test = _runs(400, informative, 0), _runs(400, informative, 1)
    fused = rs.apply_fusion(test, rs.fit_fusion(val))
    top1 = lambda run: float((run["levels"][:, 0] == 0).mean())  # noqa: E731
    by_r = np.take_along_axis(test["levels_by_rank"], np.argsort(-test["unfused"], axis=1, kind="stable"), 1)
    if informative:
        assert top1(fused) > top1(test) + 0.2            # the reranker's signal is used
    else:
        assert top1(fused) >= top1(test) - 0.02          # retrieval's order survives noise
        assert float((by_r[:, 0] == 0).mean()) < 0.2     # what the merge by r alone gave
    # the fused order is the items' order too
    assert (fused["items"][0] == test["items_by_rank"][0][fused_order(fused["p_raw"][0])]).all()


def test_fusion_features_and_round_trip(tmp_path):
    f = features(np.array([0.9, 0.7]), {"r_raw": np.array([0.5, 0.99]), "s_minus_null": np.array([1.0, -1.0])})
    assert f["first_stage_gap"].tolist() == pytest.approx([0.0, -0.2])
    assert f["rerank_logit"][0] == pytest.approx(0.0)
    fit = Fusion.fit({"a": np.r_[np.zeros(50), np.ones(50)] + np.linspace(0, 0.1, 100)}, np.r_[np.zeros(50), np.ones(50)] > 0)
    fit.save(tmp_path / "fusion.json")
    back = Fusion.load(tmp_path / "fusion.json")
    assert back.prob({"a": np.array([0.0, 1.0])}).tolist() == pytest.approx(fit.prob({"a": np.array([0.0, 1.0])}).tolist())
    with pytest.raises(ValueError, match="needs features"):
        back.prob({"b": np.array([1.0])})
    with pytest.raises(ValueError, match="positive and negative"):
        Fusion.fit({"a": np.ones(4)}, np.zeros(4, bool))


def test_fused_reranker_orders_by_fusion(embedder_dir):  # noqa: F811
    """The serving hook passes the candidates' retrieval scores; a fusion that only trusts them
    returns retrieval order whatever the model says."""
    from retrieval.rerank import ChunkwiseReranker
    from tests.test_reranker import _docs as docs

    model = MLLMReranker.from_embedder(embedder_dir, mode=LIST, scorer_hidden=16)
    only_retrieval = Fusion(["first_stage"], [5.0], 0.0, [0.0], [1.0])
    ranker = ChunkwiseReranker(model, chunk_size=4, merge_how="r", fusion=only_retrieval)
    d = docs(10)
    first = np.linspace(1.0, 0.5, 10)
    ranked = ranker.rank(d[0], d, first)
    assert ranked.order.tolist() == list(range(10))
    assert ranked.forward_passes == 3 and "unfused" in ranked.extra
    assert ranker.rank(d[0], d).extra.get("unfused") is None   # no scores given: the model's merge


@pytest.mark.parametrize("informative", [False, True])
def test_rerank_gate_serves_a_reranker_that_beats_retrieval_and_refuses_one_that_does_not(informative):
    """The gate (evaluation.promotion.decide on the paired comparison, as ab_report runs it) on a
    planted task: the fused reranker whose r knows the instance is served; the uninformed one is not."""
    from evaluation import promotion
    from evaluation.compare import compare
    from evaluation.metrics import per_query_metrics

    val, test = _runs(300, informative, 0), _runs(300, informative, 1)
    fused = rs.apply_fusion(test, rs.fit_fusion(val))
    ones = np.ones(300)
    frame = lambda run: per_query_metrics(run["levels"], ones, ones)[["I-HR@1"]]  # noqa: E731
    comp = compare(frame(test), frame(fused), n_boot=500)
    lat = {"p95": 10.0}
    cfg = {"metric": "I-HR@1", "latency_stat": "p95", "rerank_latency_budget_ms": 100.0}
    decision = promotion.decide(comp, lat, lat, cfg, model="reranker_model", budget_key="rerank_latency_budget_ms")
    assert decision.promoted == informative, decision.reasons


def test_fusion_gap_is_to_the_querys_best_score_whatever_its_sign():
    f = features(np.array([-0.2, -0.5]), {"r_raw": np.array([0.5, 0.5])})
    assert f["first_stage_gap"].tolist() == pytest.approx([0.0, -0.3])
