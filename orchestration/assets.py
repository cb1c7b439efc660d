"""Every lineage stage as a Dagster asset, built from pailitao/lineage.py (the one place the order,
the dependencies, the groups and the kinds are declared). Each body only runs its stage function
with the injected resources and turns its StageResult into asset metadata."""
from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue, asset

from orchestration.resources import MlflowTracking, PipelineConfig
from pailitao.lineage import LINEAGE, Stage, stage_function
from pailitao.stages import StageResult


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


def stage_asset(stage: Stage) -> AssetsDefinition:
    """A Dagster asset that runs one lineage stage; its name, group, deps and kinds are the
    lineage's, its description the stage function's docstring."""
    fn = stage_function(stage.name)

    @asset(name=stage.name, group_name=stage.domain, deps=list(stage.deps), kinds=set(stage.kinds),
           description=(fn.__doc__ or "").strip())
    def _asset(context: AssetExecutionContext, pipeline: PipelineConfig,
               mlflow: MlflowTracking) -> MaterializeResult:
        try:
            res = fn(pipeline.params(mlflow), dagster_run_id=context.run_id)
        finally:
            release_memory()
        return MaterializeResult(metadata=to_metadata(res))
    return _asset


ASSETS = [stage_asset(s) for s in LINEAGE]
