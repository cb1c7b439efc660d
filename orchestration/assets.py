"""Every lineage stage as a Dagster asset, built from pailitao/lineage.py (the one place the order,
the dependencies, the groups and the kinds are declared). Each body only runs its stage function
with the injected resources and turns its StageResult into asset metadata."""
from dagster import (AssetExecutionContext, AssetsDefinition, BackfillPolicy, DynamicPartitionsDefinition,
                     MaterializeResult, MetadataValue, OpExecutionContext, asset)

from orchestration.resources import MlflowTracking, PipelineConfig
from pailitao.lineage import LINEAGE, Stage, stage_function
from pailitao.stages import StageResult

# One partition per catalog shard (data/shards.py; the one key "all" for an unsharded catalog), added
# and removed by the new_catalog_version sensor and before each lineage run (orchestration/launch.py).
CATALOG_SHARDS = DynamicPartitionsDefinition(name="catalog_shards")


def to_metadata(res: StageResult) -> dict:
    md = {"path": MetadataValue.path(str(res.path)),
          "mlflow_run_id": MetadataValue.text(res.run_id or "")}
    md.update({k: MetadataValue.float(float(v)) if isinstance(v, float) else MetadataValue.int(int(v))
               for k, v in res.metrics.items()})
    md.update({k: MetadataValue.text(str(v)) for k, v in res.info.items()})
    md.update({k: MetadataValue.md(v) for k, v in res.markdown.items()})
    return md


def release_memory() -> None:
    """Hand the memory a finished stage freed back to the OS. Why: where assets share a process
    (execute_in_process, as some tests run the job), glibc keeps freed model weights and feature arrays
    in its arenas (the one-process demo lineage peaked at 14 GB though no asset alone needs 4.5 GB).
    The lineage job itself runs each step in its own process (orchestration/definitions.py)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


def sync_shards(instance, keys: list[str]) -> dict:
    """Make the instance's catalog_shards partitions exactly `keys` (the source's shards now) and
    return the run tags of one run over all of them (a partition range, in the instance's order)."""
    name = CATALOG_SHARDS.name
    have = instance.get_dynamic_partitions(name)
    for gone in set(have) - set(keys):
        instance.delete_dynamic_partition(name, gone)
    instance.add_dynamic_partitions(name, [k for k in keys if k not in have])
    order = instance.get_dynamic_partitions(name)
    return {"dagster/asset_partition_range_start": order[0], "dagster/asset_partition_range_end": order[-1]}


def run_shards(context: AssetExecutionContext | OpExecutionContext, params: dict) -> list[str] | None:
    """The shards a run of a partitioned asset (or its check) covers: its partition key, or its range
    (a backfill runs as one run: BackfillPolicy.single_run); None (every shard) for an unsharded
    catalog or a run without partitions."""
    if not params["dataset"]["sharded"] or not (context.has_partition_key or context.has_partition_key_range):
        return None
    return list(context.partition_keys)


def stage_asset(stage: Stage) -> AssetsDefinition:
    """A Dagster asset that runs one lineage stage; its name, group, deps and kinds are the
    lineage's, its description the stage function's docstring. A partitioned stage takes its run's
    shards."""
    fn = stage_function(stage.name)

    @asset(name=stage.name, group_name=stage.domain, deps=list(stage.deps), kinds=set(stage.kinds),
           description=(fn.__doc__ or "").strip(),
           partitions_def=CATALOG_SHARDS if stage.partitioned else None,
           backfill_policy=BackfillPolicy.single_run() if stage.partitioned else None)
    def _asset(context: AssetExecutionContext, pipeline: PipelineConfig,
               mlflow: MlflowTracking) -> MaterializeResult:
        params = pipeline.params(mlflow)
        try:
            shards = {"shards": run_shards(context, params)} if stage.partitioned else {}
            res = fn(params, dagster_run_id=context.run_id, **shards)
        finally:
            release_memory()
        return MaterializeResult(metadata=to_metadata(res))
    return _asset


ASSETS = [stage_asset(s) for s in LINEAGE]
