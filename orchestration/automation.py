"""When the lineage runs by itself: the nightly retraining schedule, the sensor that retrains on a
new catalog version, and the freshness checks that guard the models and the report."""
import json
import warnings
from datetime import timedelta

from dagster import (AddDynamicPartitionsRequest, DefaultScheduleStatus, DefaultSensorStatus,
                     DeleteDynamicPartitionsRequest, RunRequest, ScheduleEvaluationContext, SensorEvaluationContext,
                     SensorResult, SkipReason, build_last_update_freshness_checks, build_sensor_for_freshness_checks,
                     schedule, sensor)

from core.config import fingerprint
from data.shards import UNSHARDED, partition_keys, shard_fingerprints
from data.sources import source_fingerprint
from orchestration.assets import CATALOG_SHARDS, sync_shards
from orchestration.resources import default_resources


def _params() -> dict:
    return default_resources()["pipeline"].params()


def _follow(partitions: list[str], keys) -> list:
    """The partition requests that make `partitions` exactly `keys`."""
    add, drop = [k for k in keys if k not in partitions], [k for k in partitions if k not in keys]
    return ([AddDynamicPartitionsRequest(CATALOG_SHARDS.name, add)] if add else []) + \
        ([DeleteDynamicPartitionsRequest(CATALOG_SHARDS.name, drop)] if drop else [])


def catalog_changes(params: dict, cursor: str | None, partitions: list[str], lineage: str,
                    update: str) -> SensorResult | SkipReason:
    """What the catalog sensor does on one look. An unsharded source: the whole lineage when its
    fingerprint changed. A sharded one (data/shards.py): partitions follow the shards (added,
    deleted), each new or changed shard gets its own catalog_update run (ingested, validated and
    embedded alone, then a new index version over every shard), and a removal one run that drops
    the shard's items from the next index version. The cursor holds what was seen."""
    if not params["dataset"]["sharded"]:
        fp = source_fingerprint(params)
        if fp == cursor:
            return SkipReason(f"catalog unchanged ({fp})")
        return SensorResult(
            run_requests=[RunRequest(run_key=f"catalog-{fp}", job_name=lineage, partition_key=UNSHARDED,
                                     tags={"pailitao/catalog_fingerprint": fp})],
            dynamic_partitions_requests=_follow(partitions, [UNSHARDED]), cursor=fp)
    seen = json.loads(cursor) if cursor and cursor.startswith("{") else {}
    now = shard_fingerprints(params)
    changed = [s for s, fp in now.items() if seen.get(s) != fp or s not in partitions]
    removed = sorted(set(partitions) - set(now))
    if not changed and not removed:
        return SkipReason(f"{len(now)} shards unchanged")
    runs = [RunRequest(run_key=f"shard-{s}-{now[s]}", job_name=update, partition_key=s,
                       tags={"pailitao/shard_fingerprint": now[s]}) for s in changed]
    if not changed:   # only removals: one run over a remaining shard builds the index without them
        runs.append(RunRequest(run_key=f"drop-{fingerprint([removed, now])}", job_name=update,
                               partition_key=next(iter(now)), tags={"pailitao/shards_removed": ",".join(removed)}))
    return SensorResult(run_requests=runs, dynamic_partitions_requests=_follow(partitions, now),
                        cursor=json.dumps(now, sort_keys=True))


def schedule_and_sensors(job, update_job):
    """The nightly schedule over the lineage job, the catalog sensor (catalog_changes), and the
    freshness checks (the served model, the reranker and the report may not be older than
    schedule.freshness_hours)."""
    cfg = _params()["schedule"]

    @schedule(name="nightly_retraining", job=job, cron_schedule=cfg["cron"], execution_timezone=cfg["timezone"],
              default_status=DefaultScheduleStatus.STOPPED,
              description="Retrain and re-evaluate the whole lineage every night, over every catalog shard.")
    def nightly(context: ScheduleEvaluationContext):
        # the partitions follow the source's shards first, so the one run covers exactly them
        return RunRequest(tags=sync_shards(context.instance, partition_keys(_params())))

    @sensor(name="new_catalog_version", jobs=[job, update_job], minimum_interval_seconds=int(cfg["sensor_seconds"]),
            default_status=DefaultSensorStatus.STOPPED,
            description="A changed catalog: the whole lineage (unsharded), or a catalog_update run per new or "
                        "changed shard, partitions following the shards.")
    def new_catalog_version(context: SensorEvaluationContext):
        return catalog_changes(_params(), context.cursor, context.instance.get_dynamic_partitions(CATALOG_SHARDS.name),
                               job.name, update_job.name)

    # asset checks (visible and red in the UI), not FreshnessPolicy: Dagster marks these superseded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freshness = build_last_update_freshness_checks(
            assets=["embedding_model", "reranker_model", "ab_report"],
            lower_bound_delta=timedelta(hours=float(cfg["freshness_hours"])))
        freshness_sensor = build_sensor_for_freshness_checks(freshness_checks=freshness)
    return [nightly], [new_catalog_version, freshness_sensor], freshness
