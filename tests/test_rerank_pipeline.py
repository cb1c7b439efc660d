"""Reranking lineage on the tiny profile: reranker_dataset contents, the trained rerankers served
through the search pipeline (serving.rerank list / point), the registered pyfunc, bad config."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.config import Paths, deep_merge
from retrieval import pipeline as pl
from retrieval.models import build_reranker
from training.reranker import CALIBRATION_FILE


@pytest.fixture(scope="module")
def catalog_first(tiny_lineage) -> dict:
    from data.schema import Catalog
    from evaluation.retrieval import gallery

    catalog = Catalog.load(Paths.from_params(tiny_lineage).asset("validated_catalog"))
    row = gallery(catalog).iloc[0]
    path = catalog.image_file(row["path"])
    return {**row.to_dict(), "path": str(path), "bytes": path.read_bytes()}


def test_reranker_dataset_has_graded_balanced_chunks(tiny_lineage):
    ds = Paths.from_params(tiny_lineage).asset("reranker_dataset")
    cands = pd.read_parquet(ds / "candidates.parquet")
    chunks = pd.read_parquet(ds / "chunks.parquet")
    queries = pd.read_parquet(ds / "queries.parquet")
    n = tiny_lineage["serving"]["candidates"]
    assert set(cands["level"].unique()) <= {0, 1, 2, 3}
    assert cands.groupby("query_id")["rank"].apply(lambda r: list(r) == list(range(len(r)))).all()
    assert cands.groupby("query_id").size().max() <= n
    assert chunks.groupby(["query_id", "chunk"]).size().max() <= tiny_lineage["reranker"]["chunk_size"]
    assert set(chunks["query_id"]) <= set(queries["query_id"])
    # every chunk row comes from retrieval: the top-N, or an instance just past it (a near miss)
    deep = tiny_lineage["reranker"]["near_miss_depth"]
    assert chunks["rank"].between(0, deep - 1).all()
    beyond = chunks[chunks["rank"] >= n].merge(queries[["query_id", "item_id"]], on="query_id", suffixes=("", "_q"))
    assert (beyond["level"] == 0).all() and (beyond["item_id"] == beyond["item_id_q"]).all()
    # every served noise level is trained, each picked item at several of them
    assert set(queries["level"]) == set(tiny_lineage["reranker"]["query_levels"])
    assert queries.groupby("item_id")["level"].nunique().min() == min(3, tiny_lineage["reranker"]["queries_per_item"])
    for f in queries["image"]:
        assert (ds / f).is_file()
    assert (pd.read_parquet(ds / "val_candidates.parquet")["level"] >= 0).all()


@pytest.mark.parametrize("kind", ["list", "point"])
def test_search_with_a_trained_reranker(tiny_lineage, catalog_first, kind):
    params = deep_merge(tiny_lineage, {"serving": {"rerank": kind}})
    model_dir = Paths.from_params(params).asset("reranker_model" if kind == "list" else "reranker_pointwise") / "model"
    assert (model_dir / CALIBRATION_FILE).is_file()
    searcher = pl.build_searcher(params)
    plain = pl.build_searcher(deep_merge(params, {"serving": {"rerank": "none"}}), embedder=searcher.embedder,
                              info=searcher.model)
    res = searcher.search(catalog_first["bytes"], catalog_first["title"], k=params["serving"]["candidates"])
    base = plain.search(catalog_first["bytes"], catalog_first["title"], k=params["serving"]["candidates"])
    assert sorted(c.item_id for c in res.results) == sorted(c.item_id for c in base.results)
    assert all(0.0 <= c.p_instance <= 1.0 and c.rerank_score is not None for c in res.results)
    assert res.latency_ms["rerank"] > 0
    parts = [res.latency_ms[f"rerank_{p}"] for p in pl.RERANK_PARTS]   # the reranker's cost by part
    assert all(v >= 0 for v in parts) and res.latency_ms["rerank_model"] > 0
    assert sum(parts) <= res.latency_ms["rerank"] + 1.0
    assert "rerank_model" not in base.latency_ms
    body = res.to_dict()
    assert "p_instance" in body["results"][0] and "image" not in body["results"][0]   # no server paths leak
    passes = searcher.reranker.last_stats["forward_passes"]
    m = params["reranker"]["chunk_size"]
    assert passes == (len(res.results) if kind == "point" else -(-len(res.results) // m))


def test_registered_reranker_pyfunc_ranks_rows(tiny_lineage, catalog_first, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_lineage["mlflow"]["tracking_uri"])
    mlflow.set_tracking_uri(tiny_lineage["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/pailitao-listwise-reranker/latest")
    items = pd.read_parquet(Paths.from_params(tiny_lineage).asset("item_embeddings") / "items.parquet").head(5)
    root = Paths.from_params(tiny_lineage).asset("item_embeddings").parent
    df = pd.DataFrame({"query_id": "q1", "query_image": [catalog_first["bytes"]] * len(items), "query_text": "",
                       "image": [(root / p).read_bytes() for p in items["image"]], "text": items["title"]})
    out = model.predict(df)
    assert sorted(out["rank"]) == [1, 2, 3, 4, 5]
    assert np.all((out["p_instance"] >= 0) & (out["p_instance"] <= 1))
    ranker, cfg = model.unwrap_python_model().ranker, tiny_lineage["reranker"]   # settings as trained
    assert (ranker.chunk_size, ranker.assign, ranker.merge_how) == (cfg["chunk_size"], cfg["assign"], cfg["merge"])


def test_gated_rerank_follows_the_ab_report_gate(tiny_lineage, tmp_path):
    from core.io import read_json, write_json

    paths = Paths.from_params(tiny_lineage)
    decision = read_json(paths.asset("ab_report") / "meta.json")["rerank_decision"]
    assert decision["model"] == "reranker_model" and "I-HR@1" in decision["reasons"][0]
    assert (build_reranker(tiny_lineage, "gated") is not None) == decision["promoted"]
    work = deep_merge(tiny_lineage, {"workdir": str(tmp_path)})
    assert build_reranker(work, "gated") is None      # no report yet: embedding order
    processed = Paths.from_params(work).processed
    processed.mkdir(parents=True)
    (processed / "reranker_model").symlink_to(paths.asset("reranker_model"))
    for promoted in (True, False):
        write_json({"rerank_decision": {**decision, "promoted": promoted}}, processed / "ab_report" / "meta.json")
        ranker = build_reranker(work, "gated")
        assert (ranker is not None) == promoted and (ranker is None or ranker.model.mode == "list")


def test_bad_rerank_config_is_named(tiny_lineage, tmp_path):
    with pytest.raises(ValueError, match="serving.rerank must be"):
        build_reranker(tiny_lineage, "listwise")
    empty = deep_merge(tiny_lineage, {"workdir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="pailitao reranker_model"):
        build_reranker(empty, "list")
    assert build_reranker(tiny_lineage, "none") is None


def test_prf_by_group_matches_pooled_prf_and_splits_by_noise():
    from evaluation.metrics import precision_recall_f1
    from pailitao.stages.reranking import prf, prf_by_group

    # 3 queries x 3 slots; 9 = empty slot. Instance positives are level 0, concept 0 or 1.
    levels = np.array([[0, 1, 2], [2, 0, 9], [1, 2, 2]])
    p = np.array([[.9, .6, .2], [.7, .4, -np.inf], [.8, .1, .3]])
    run = {"levels_by_rank": levels, "p_instance": p, "p_concept": p}
    thr = {"instance": 0.5, "concept": 0.5}
    out = prf_by_group(run, thr, ["clean", "hard", "hard"], n_boot=200)
    filled = levels < 9
    for name, pos in (("instance", levels == 0), ("concept", levels <= 1)):
        want = precision_recall_f1(p[filled], pos[filled], 0.5)
        got = [out[f"{name}_{s}"]["all"]["value"] / 100 for s in ("P", "R", "F1")]
        assert got == pytest.approx(want)
    flat, _ = prf(run, thr)
    assert out["instance_F1"]["all"]["value"] == pytest.approx(flat["instance_F1"])
    # hard: predicted {(1,0) level 2, (2,0) level 1}, instance positive (1,1) missed -> P 0, R 0
    assert out["instance_P"]["hard"]["value"] == 0 and out["instance_R"]["hard"]["value"] == 0
    assert out["concept_P"]["hard"]["value"] == pytest.approx(50.0)        # (2,0) is a concept hit
    assert out["instance_P"]["clean"]["value"] == pytest.approx(50.0)      # (0,0) yes, (0,1) no
    assert {"value", "ci_low", "ci_high"} == set(out["concept_R"]["all"])
