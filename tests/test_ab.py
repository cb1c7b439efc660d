"""Online A/B: stable, well-balanced bucketing; impressions and clicks in the sqlite event log;
two variants served by their own searcher and index; `pailitao ab simulate` makes traffic."""
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from scipy.stats import chisquare

from pailitao.cli import main
from core.config import Paths, deep_merge
from retrieval.models import resolve_model, variant_dirs
from serving.ab import EventLog, UnknownImpression, Variant, assign, bucket, variants_from_params
from serving.app import create_app

VARIANTS = [Variant("control", "baseline_embedder", 0.5), Variant("treatment", "embedding_model", 0.5)]


def test_assignment_is_stable_and_salted():
    ids = [f"user-{i}" for i in range(200)]
    first = [assign(u, "salt-a", VARIANTS).name for u in ids]
    assert first == [assign(u, "salt-a", VARIANTS).name for u in ids]   # same unit, same variant
    other = [assign(u, "salt-b", VARIANTS).name for u in ids]
    assert 0.3 < np.mean([a != b for a, b in zip(first, other)]) < 0.7  # a new salt re-randomises
    assert 0 <= bucket("x", "s") < 1 and bucket("x", "s") == bucket("x", "s")


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.8), (1, 1, 2)])
def test_split_matches_the_weights_on_10k_ids(weights):
    variants = [Variant(f"v{i}", "m", w) for i, w in enumerate(weights)]
    names = [assign(f"session-{i:06d}", "pailitao-ab-1", variants).name for i in range(10_000)]
    observed = [names.count(v.name) for v in variants]
    expected = [10_000 * w / sum(weights) for w in weights]
    assert chisquare(observed, expected).pvalue > 0.001, (observed, expected)


def test_zero_weight_variant_gets_nobody():
    variants = [Variant("off", "m", 0.0), Variant("on", "m", 1.0)]
    assert {assign(f"u{i}", "s", variants).name for i in range(1000)} == {"on"}


def test_variants_from_params(tiny_lineage):
    assert [v.name for v in variants_from_params(tiny_lineage)] == ["default"]
    on = deep_merge(tiny_lineage, {"ab": {"enabled": True}})
    assert [(v.name, v.model) for v in variants_from_params(on)] == [("control", "baseline_embedder"),
                                                                     ("treatment", "embedding_model")]
    with pytest.raises(ValueError, match="weights"):
        variants_from_params(deep_merge(on, {"ab": {"variants": {"control": {"weight": -1}}}}))


def test_event_log_writes_impressions_and_clicks_in_wal_mode(tmp_path):
    log = EventLog(tmp_path / "ev.sqlite")
    results = [{"item_id": f"i{p}", "score": 1 - p / 10} for p in range(3)]
    log.impression(request_id="r1", query_id="q1", unit_id="u1", variant="treatment", model="m",
                   index_version="v1", results=results, latency_ms={"total": 12.5, "embed": 10.0})
    assert log.click("r1", "i2") == {"request_id": "r1", "item_id": "i2", "variant": "treatment", "position": 2}
    with pytest.raises(UnknownImpression):
        log.click("r1", "i9")
    imp, clicks = log.read("impressions"), log.read("clicks")
    assert list(imp["position"]) == [0, 1, 2] and set(imp["variant"]) == {"treatment"}
    assert json.loads(imp["latency_json"][0])["embed"] == 10.0 and imp["latency_ms"][0] == 12.5
    assert clicks[["query_id", "unit_id", "variant", "position", "item_id"]].values.tolist() == \
        [["q1", "u1", "treatment", 2, "i2"]]
    log.close()
    with sqlite3.connect(tmp_path / "ev.sqlite") as db:   # another reader (analysis) sees it all
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM impressions").fetchone()[0] == 3


def test_each_variant_is_served_by_its_own_model_and_index(tiny_ab, tmp_path):
    log = EventLog(tmp_path / "ev.sqlite")
    with TestClient(create_app(tiny_ab, event_log=log)) as client:
        health = client.get("/healthz").json()
        assert health["ab"] and set(health["variants"]) == {"control", "treatment"}
        dirs = {name: v["index_dir"] for name, v in health["variants"].items()}
        served = resolve_model(tiny_ab).name   # the champion uses the lineage's index, the other arm its own
        for name, model in (("control", "baseline_embedder"), ("treatment", "embedding_model")):
            assert dirs[name] == str(variant_dirs(tiny_ab, model, name)[1])
            assert (dirs[name] == str(Paths.from_params(tiny_ab).asset("ann_index"))) == (model == served)
        assert health["variants"]["control"]["model_fingerprint"] != health["variants"]["treatment"]["model_fingerprint"]
        users = [f"user-{i}" for i in range(16)]
        got = {}
        for u in users:
            body = client.post("/search", data={"text": "red mug", "k": "5", "query_id": f"q-{u}"},
                               headers={"X-User-Id": u}).json()
            want = assign(u, tiny_ab["ab"]["salt"], variants_from_params(tiny_ab))
            assert body["variant"] == want.name and body["model"] == want.model
            got[u] = body
        assert {b["variant"] for b in got.values()} == {"control", "treatment"}
        b = got[users[0]]
        assert client.post("/click", json={"request_id": b["request_id"], "item_id": b["results"][1]["item_id"]},
                           headers={"X-User-Id": users[0]}).json()["position"] == 1
    imp, clicks = log.read("impressions"), log.read("clicks")
    assert len(imp) == 16 * 5 and set(imp["query_id"]) == {f"q-{u}" for u in users}
    assert imp.groupby("request_id")["position"].apply(list).map(lambda p: p == [0, 1, 2, 3, 4]).all()
    assert (imp.groupby("unit_id")["variant"].nunique() == 1).all()
    assert clicks["variant"].tolist() == [b["variant"]] and clicks["unit_id"].tolist() == [users[0]]


def test_cli_ab_simulate_makes_traffic(tiny_ab, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_ab["mlflow"]["tracking_uri"])
    args = ["--profile", "tiny", "--workdir", tiny_ab["workdir"]]
    assert main(["ab", "build", *args]) == 0    # both variants' indexes exist: nothing is rebuilt
    out = capsys.readouterr().out
    assert {name: v["built"] for name, v in json.loads(out[out.index("{"):]).items()} == \
        {"control": False, "treatment": False}
    assert main(["ab", "simulate", "--queries", "20", "--users", "5", *args]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "event_log"'):])
    stats = summary["variants"]
    assert sum(s["requests"] for k, s in stats.items() if k != "errors") == 20 and "errors" not in stats
    events = EventLog(summary["event_log"])
    imp, clicks = events.read("impressions"), events.read("clicks")
    assert imp["request_id"].nunique() >= 20 and set(imp["variant"]) <= {"control", "treatment"}
    assert len(clicks) == sum(s["clicks"] for s in stats.values())
    q = pd.read_parquet(Paths.from_params(tiny_ab).asset("query_sets") / "queries.parquet")
    assert set(imp["query_id"]) & set(q.loc[q["split"] == "test", "query_id"])
