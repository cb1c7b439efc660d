"""Data domain: raw_catalog -> validated_catalog -> splits -> query_sets, and the blocking
Great Expectations checks on raw_catalog. Bodies only call pailitao.stages."""

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext,
                     MaterializeResult, MetadataValue, asset, multi_asset_check)

from data.validation import CHECK_NAMES
from orchestration.resources import MlflowTracking, PipelineConfig
from pailitao import stages

GROUP = "data"


def to_metadata(res: stages.StageResult) -> dict:
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


def materialize(stage, context: AssetExecutionContext, pipeline: PipelineConfig,
                mlflow: MlflowTracking) -> MaterializeResult:
    try:
        res = stage(pipeline.params(mlflow), dagster_run_id=context.run_id)
    finally:
        release_memory()
    return MaterializeResult(metadata=to_metadata(res))


def stage_asset(stage, group: str, deps: tuple = (), kinds: frozenset = frozenset({"python", "parquet"})):
    """A Dagster asset that runs one pipeline stage; its name and description are the stage's."""
    @asset(name=stage.__name__, group_name=group, deps=list(deps), kinds=set(kinds),
           description=(stage.__doc__ or "").strip())
    def _asset(context: AssetExecutionContext, pipeline: PipelineConfig,
               mlflow: MlflowTracking) -> MaterializeResult:
        return materialize(stage, context, pipeline, mlflow)
    return _asset


raw_catalog = stage_asset(stages.raw_catalog, GROUP)


@multi_asset_check(specs=[AssetCheckSpec(name, asset="raw_catalog", blocking=True) for name in CHECK_NAMES])
def raw_catalog_checks(pipeline: PipelineConfig):
    """Great Expectations rules; a failed error-severity rule blocks everything downstream."""
    for o in stages.check_raw_catalog(pipeline.params()):
        yield AssetCheckResult(check_name=o.name, asset_key="raw_catalog", passed=o.passed,
                               severity=AssetCheckSeverity.ERROR if o.severity == "error"
                               else AssetCheckSeverity.WARN,
                               description=o.description, metadata={"details": MetadataValue.json(o.metadata)})


validated_catalog = stage_asset(stages.validated_catalog, GROUP, deps=(raw_catalog,))
splits = stage_asset(stages.splits, GROUP, deps=(validated_catalog,))
query_sets = stage_asset(stages.query_sets, GROUP, deps=(validated_catalog, splits))

ASSETS = [raw_catalog, validated_catalog, splits, query_sets]
CHECKS = [raw_catalog_checks]
