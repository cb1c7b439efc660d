"""The Dagster Definitions: the lineage job materializes on the tiny profile with each step in its
own process (as `make demo` and the UI run it), and a failed blocking Great Expectations check stops
everything downstream."""
import logging

import pandas as pd
from dagster import DagsterInstance, instance_for_test

from data.validation import CHECK_NAMES
from orchestration.definitions import defs
from orchestration.launch import decisions, execute
from orchestration.logs import event_line, key_numbers
from pailitao.lineage import NAMES
from tests.conftest import write_manifest

LINEAGE = list(NAMES)   # pailitao/lineage.py: the one declaration
FRESHNESS = {"embedding_model", "reranker_model", "ab_report"}   # assets under a freshness check


def _materialized(result) -> list[str]:
    return [ev.event_specific_data.materialization.asset_key.to_user_string()
            for ev in result.get_asset_materialization_events()]


def _checks(result) -> dict:
    return {ev.event_specific_data.check_name: ev.event_specific_data
            for ev in result.all_events if ev.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_definitions_hold_the_lineage_and_blocking_checks():
    job = defs.resolve_job_def("lineage")
    assert job is not None
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert set(LINEAGE) <= keys
    check_keys = {k.name for k in graph.asset_check_keys}
    assert set(CHECK_NAMES) | {"ann_index_recall"} <= check_keys


def test_lineage_job_materializes_on_the_tiny_profile(tmp_path, mlflow_uri):
    with instance_for_test() as instance:   # step processes need a persistent instance
        result = execute(profile="tiny", workdir=str(tmp_path / "work"), dagster_instance=instance)
        workers = {ev.step_key: ev.event_specific_data.metadata["pid"].value for ev in result.all_events
                   if ev.event_type_value == "STEP_WORKER_STARTED"}
    assert result.success
    assert len(set(workers.values())) == len(workers) >= len(LINEAGE)   # one process per step
    done = _materialized(result)
    assert sorted(done) == sorted(LINEAGE) and done[:4] == LINEAGE[:4]
    checks = _checks(result)
    assert set(CHECK_NAMES) | {"ann_index_recall"} <= set(checks)
    assert done.index("embedding_promotion") < done.index("item_embeddings") and done[-1] == "ab_report"
    assert all(c.passed for n, c in checks.items() if n != "duplicate_images")
    queries = pd.read_parquet(tmp_path / "work/data/processed/query_sets/queries.parquet")
    assert set(queries["level"]) == {"clean", "mild", "hard", "text", "image_text"} and set(queries["split"]) == {"val", "test"}
    meta = {ev.event_specific_data.materialization.asset_key.to_user_string():
            ev.event_specific_data.materialization.metadata
            for ev in result.get_asset_materialization_events()}
    assert meta["raw_catalog"]["synthetic"].value == "True"
    assert meta["query_sets"]["sample_queries"].value.count("data:image/png;base64") == 1
    assert len(meta["splits"]["mlflow_run_id"].value) == 32
    # what `make demo` prints while it runs: a few lines per stage (orchestration/logs.py)
    shown = [line for ev in result.all_events if (line := event_line(_record(ev)))]
    assert shown[:2] == ["stage raw_catalog started", "raw_catalog: " + key_numbers(meta["raw_catalog"])]
    assert shown[2].startswith("stage raw_catalog done in ") and shown[2].endswith(" s")
    assert "check duplicate_images warns" in "\n".join(shown) or checks["duplicate_images"].passed
    assert len(shown) <= 3 * len(workers) + len(checks)
    lines = decisions(result).splitlines()   # what `make demo` ends with
    assert lines[0] == f"A/B report: {tmp_path / 'work/data/processed/ab_report/report.html'}"
    assert lines[1].startswith(("Champion decision: promoted to champion (I-HR@1",
                                "Champion decision: kept as challenger (I-HR@1"))
    assert lines[2].startswith("Listwise reranker: ") and "I-HR@1" in lines[2] and "gated" in lines[2]
    for model in ("embedding_model", "baseline_embedder"):
        assert "val_all_I_HR_at_1" in meta[model] and meta[model]["registered_version"].value
        assert "data:image/png;base64" in meta[model]["loss_curve"].value


def _record(event) -> logging.LogRecord:
    """The record Dagster hands a run's loggers for one event."""
    rec = logging.LogRecord("dagster", logging.DEBUG, "", 0, event.message or "", (), None)
    rec.dagster_meta = {"dagster_event": event, "step_key": event.step_key, "orig_message": event.message}
    return rec


def test_stage_lines_keep_an_asset_s_own_lines_and_drop_engine_debug():
    rec = logging.LogRecord("dagster", logging.INFO, "", 0, "x", (), None)
    rec.dagster_meta = {"dagster_event": None, "step_key": "splits", "orig_message": "wrote 3 splits"}
    assert event_line(rec) == "wrote 3 splits"
    rec.levelno = logging.DEBUG
    assert event_line(rec) is None


def test_failed_blocking_check_stops_downstream(tmp_path, mlflow_uri):
    root = write_manifest(tmp_path / "m", n_items=6)
    items = (root / "items.csv").read_text().splitlines()
    (root / "items.csv").write_text("\n".join(items + [items[1]]) + "\n")  # duplicate item_id
    result = execute(profile="tiny", dataset=str(root), workdir=str(tmp_path / "work"),
                     dagster_instance=DagsterInstance.ephemeral(), in_process=True)
    assert _materialized(result) == ["raw_catalog"]
    checks = _checks(result)
    # the duplicated rows are quarantined per item; 2 of 7 rows is above the share: the catalog blocks
    assert not checks["items_quarantine"].passed and "duplicate item_id" in str(checks["items_quarantine"].metadata)
    assert not (tmp_path / "work/data/processed/validated_catalog").exists()
