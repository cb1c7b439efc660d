"""When the lineage runs by itself: the nightly retraining schedule, the sensor that retrains on a
new catalog version, and the freshness checks that guard the models and the report."""
import warnings
from datetime import timedelta

from dagster import (DefaultScheduleStatus, DefaultSensorStatus, RunRequest, ScheduleDefinition, SensorEvaluationContext,
                     SkipReason, build_last_update_freshness_checks, build_sensor_for_freshness_checks, sensor)

from data.sources import source_fingerprint
from orchestration.resources import default_resources


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
