"""The promotion gate (planted better / worse / slower treatments), the registry aliases it moves,
`serving.model: champion` resolution, and the Dagster schedule + catalog sensor."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation import promotion
from evaluation.compare import compare
from evaluation.metrics import latency_summary
from retrieval.registry import EMBEDDER_NAMES

GATE = {"metric": "I-HR@1", "latency_stat": "p95", "latency_budget_ms": 10.0}


def _arms(effect: float, n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-query I-HR@1 hits of a control and a treatment that finds `effect` more (or fewer) of them."""
    rng = np.random.default_rng(seed)
    c = (rng.random(n) < 0.4).astype(float)
    t = c.copy()
    flip = rng.random(n) < abs(effect)
    t[flip & (c == (0 if effect > 0 else 1))] = 1.0 if effect > 0 else 0.0
    idx = [f"q{i}" for i in range(n)]
    return pd.DataFrame({"I-HR@1": c}, index=idx), pd.DataFrame({"I-HR@1": t}, index=idx)


def _gate(effect: float, slower_ms: float = 0.0) -> promotion.Decision:
    c, t = _arms(effect)
    lat = np.random.default_rng(1).gamma(4, 5, 400)
    return promotion.decide(compare(c, t, n_boot=1000), latency_summary(lat), latency_summary(lat + slower_ms), GATE)


def test_gate_promotes_a_better_model_and_refuses_a_worse_or_slower_one():
    better = _gate(0.25)
    assert better.promoted and better.alias == "champion" and "significant win" in better.reasons[0]
    worse = _gate(-0.25)
    assert not worse.promoted and worse.alias == "challenger" and "significant loss" in worse.reasons[0]
    same = _gate(0.0)
    assert not same.promoted and "no significant difference" in same.reasons[0]
    slower = _gate(0.25, slower_ms=25.0)
    assert not slower.promoted and "exceeds the budget" in slower.reasons[1]
    # the rerank gate: same rule, its own (larger) budget and the reranker as the treatment
    c, t = _arms(0.25)
    lat = np.random.default_rng(1).gamma(4, 5, 400)
    rerank = promotion.decide(compare(c, t, n_boot=1000), latency_summary(lat), latency_summary(lat + 60.0),
                              {**GATE, "rerank_latency_budget_ms": 100.0}, model="reranker_model",
                              budget_key="rerank_latency_budget_ms")
    assert rerank.promoted and rerank.model == "reranker_model" and "within the budget of 100 ms" in rerank.reasons[1]
    with pytest.raises(ValueError, match="promotion.metric"):
        promotion.decide(compare(*_arms(0.1)), latency_summary([1.0]), latency_summary([1.0]), {**GATE, "metric": "nDCG"})


@pytest.fixture
def registry(tmp_path, mlflow_uri):
    """Both embedders registered (one version each) in a fresh MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    for stage in (promotion.CONTROL, promotion.TREATMENT):
        name = EMBEDDER_NAMES[stage]
        client.create_registered_model(name)
        (tmp_path / stage).mkdir()
        client.create_model_version(name, str(tmp_path / stage))
    return client


def _holder(client, stage):
    try:
        return str(client.get_model_version_by_alias(EMBEDDER_NAMES[stage], "champion").version)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def test_apply_moves_the_aliases(registry, mlflow_uri):
    refused = promotion.apply(_gate(0.0), mlflow_uri)   # nothing promoted yet: the control is the incumbent
    assert refused.champion == promotion.CONTROL and _holder(registry, promotion.CONTROL) == "1"
    assert str(registry.get_model_version_by_alias(EMBEDDER_NAMES[promotion.TREATMENT], "challenger").version) == "1"
    won = promotion.apply(_gate(0.25), mlflow_uri)       # a win: champion moves, exactly one holder
    assert won.champion == promotion.TREATMENT and _holder(registry, promotion.TREATMENT) == "1"
    assert _holder(registry, promotion.CONTROL) is None
    again = promotion.apply(_gate(-0.25), mlflow_uri)    # a later loss keeps the existing champion
    assert again.champion == promotion.TREATMENT and _holder(registry, promotion.CONTROL) is None


def test_apply_aliases_this_lineage_s_versions_not_another_run_s(registry, mlflow_uri, tmp_path):
    from retrieval.registry import FINGERPRINT_TAG

    name = EMBEDDER_NAMES[promotion.TREATMENT]
    ours = registry.create_model_version(name, str(tmp_path / promotion.TREATMENT), tags={FINGERPRINT_TAG: "ours"})
    registry.create_model_version(name, str(tmp_path / promotion.TREATMENT), tags={FINGERPRINT_TAG: "theirs"})
    won = promotion.apply(_gate(0.25), mlflow_uri, {promotion.TREATMENT: "ours"})   # v3 is another run's
    assert won.versions[promotion.TREATMENT] == str(ours.version) == "2"
    assert _holder(registry, promotion.TREATMENT) == "2"


def test_serving_champion_resolves_through_the_aliases(tiny_lineage, monkeypatch):
    """The service loads champion: after the tiny lineage's gate, `serving.model: champion` is the
    registered embedder holding the alias (a registry download, same checkpoint)."""
    import mlflow

    from retrieval.models import resolve_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_lineage["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient(tiny_lineage["mlflow"]["tracking_uri"])
    holders = [s for s in (promotion.TREATMENT, promotion.CONTROL) if _holder(client, s)]
    assert len(holders) == 1
    info = resolve_model(tiny_lineage)
    assert info.name == holders[0] and info.source.startswith(f"models:/{EMBEDDER_NAMES[holders[0]]}@champion")


def test_schedule_and_sensor_fire_on_a_changed_catalog(tmp_path, monkeypatch):
    from dagster import RunRequest, build_sensor_context, instance_for_test

    from orchestration.definitions import defs
    from tests.conftest import write_manifest

    assert defs.resolve_schedule_def("nightly_retraining").cron_schedule == "0 2 * * *"
    root = write_manifest(tmp_path / "m", n_items=4)
    monkeypatch.setenv("PAILITAO_DATASET", str(root))
    sensor = defs.resolve_sensor_def("new_catalog_version")
    with instance_for_test() as instance:   # partitioned run requests need a persistent instance
        def tick(cursor):
            return sensor.evaluate_tick(build_sensor_context(cursor=cursor, instance=instance,
                                                             instance_ref=instance.get_ref(), definitions=defs))

        first = tick(None)
        assert len(first.run_requests) == 1 and isinstance(first.run_requests[0], RunRequest)
        same = tick(first.cursor)
        assert not same.run_requests and same.skip_message and "unchanged" in same.skip_message
        (root / "items.csv").write_text((root / "items.csv").read_text() + "item999,new product,apparel/hats,item999,\n")
        changed = tick(first.cursor)
        assert len(changed.run_requests) == 1 and changed.cursor != first.cursor
        assert changed.run_requests[0].run_key != first.run_requests[0].run_key
