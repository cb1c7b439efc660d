"""Evaluation domain: embedding_promotion (offline embedding A/B + the champion gate) and
ab_report (the whole A/B report), the freshness checks that guard the models and the report,
the nightly retraining schedule and the sensor that retrains on a new catalog version."""
import warnings
from datetime import timedelta

from dagster import (DefaultScheduleStatus, DefaultSensorStatus, RunRequest, ScheduleDefinition, SensorEvaluationContext,
                     SkipReason, build_last_update_freshness_checks, build_sensor_for_freshness_checks, sensor)

from data.sources import source_fingerprint
from evaluation import ab_stages
from orchestration.data_assets import query_sets, stage_asset
from orchestration.model_assets import baseline_embedder, embedding_model
from orchestration.resources import default_resources
from pailitao.config import load_params

GROUP = "evaluation"

embedding_promotion = stage_asset(ab_stages.embedding_promotion, GROUP,
                                  deps=(embedding_model, baseline_embedder, query_sets),
                                  kinds=frozenset({"pytorch", "mlflow"}))
# deps by key: the reranking domain imports the retrieval domain, which depends on embedding_promotion
ab_report = stage_asset(ab_stages.ab_report, GROUP,
                        deps=("embedding_promotion", "ann_index", "reranker_model", "reranker_pointwise"),
                        kinds=frozenset({"html", "mlflow"}))

ASSETS = [embedding_promotion, ab_report]


def _params() -> dict:
    return default_resources()["pipeline"].params()


def schedule_and_sensors(job):
    """The nightly schedule over the lineage job, the catalog sensor, and the freshness checks
    (the served model, the reranker and the report may not be older than schedule.freshness_hours)."""
    cfg = _params()["schedule"]
    nightly = ScheduleDefinition(name="nightly_retraining", job=job, cron_schedule=cfg["cron"],
                                 execution_timezone=cfg["timezone"], default_status=DefaultScheduleStatus.STOPPED,
                                 description="Retrain and re-evaluate the whole lineage every night.")

    @sensor(name="new_catalog_version", job=job, minimum_interval_seconds=int(cfg["sensor_seconds"]),
            default_status=DefaultSensorStatus.STOPPED,
            description="Starts the lineage when the catalog source's content fingerprint changes.")
    def new_catalog_version(context: SensorEvaluationContext):
        fp = source_fingerprint(_params())
        if fp == context.cursor:
            return SkipReason(f"catalog unchanged ({fp})")
        context.update_cursor(fp)
        return RunRequest(run_key=f"catalog-{fp}", tags={"pailitao/catalog_fingerprint": fp})

    # asset checks (visible and red in the UI), not FreshnessPolicy: Dagster marks these superseded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freshness = build_last_update_freshness_checks(
            assets=["embedding_model", "reranker_model", "ab_report"],
            lower_bound_delta=timedelta(hours=float(cfg["freshness_hours"])))
        freshness_sensor = build_sensor_for_freshness_checks(freshness_checks=freshness)
    return [nightly], [new_catalog_version, freshness_sensor], freshness
