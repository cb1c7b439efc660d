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


def materialize(stage, context: AssetExecutionContext, pipeline: PipelineConfig,
                 mlflow: MlflowTracking) -> MaterializeResult:
    res = stage(pipeline.params(mlflow), dagster_run_id=context.run_id)
    return MaterializeResult(metadata=to_metadata(res))


@asset(group_name=GROUP, kinds={"python", "parquet"})
def raw_catalog(context: AssetExecutionContext, pipeline: PipelineConfig,
                mlflow: MlflowTracking) -> MaterializeResult:
    """The configured catalog source, normalized: Parquet tables plus RGB-on-white images; bad
    images go to the quarantine table with their reason."""
    return materialize(stages.raw_catalog, context, pipeline, mlflow)


@multi_asset_check(specs=[AssetCheckSpec(name, asset="raw_catalog", blocking=True) for name in CHECK_NAMES])
def raw_catalog_checks(pipeline: PipelineConfig):
    """Great Expectations rules; a failed error-severity rule blocks everything downstream."""
    for o in stages.check_raw_catalog(pipeline.params()):
        yield AssetCheckResult(check_name=o.name, asset_key="raw_catalog", passed=o.passed,
                               severity=AssetCheckSeverity.ERROR if o.severity == "error"
                               else AssetCheckSeverity.WARN,
                               description=o.description, metadata={"details": MetadataValue.json(o.metadata)})


@asset(group_name=GROUP, deps=[raw_catalog], kinds={"python", "parquet"})
def validated_catalog(context: AssetExecutionContext, pipeline: PipelineConfig,
                      mlflow: MlflowTracking) -> MaterializeResult:
    """The catalog that passed validation: quarantined images and image-less items removed."""
    return materialize(stages.validated_catalog, context, pipeline, mlflow)


@asset(group_name=GROUP, deps=[validated_catalog], kinds={"python", "parquet"})
def splits(context: AssetExecutionContext, pipeline: PipelineConfig,
           mlflow: MlflowTracking) -> MaterializeResult:
    """Deterministic train / val / test split by instance (a manifest's split column wins)."""
    return materialize(stages.splits, context, pipeline, mlflow)


@asset(group_name=GROUP, deps=[validated_catalog, splits], kinds={"python", "parquet"})
def query_sets(context: AssetExecutionContext, pipeline: PipelineConfig,
               mlflow: MlflowTracking) -> MaterializeResult:
    """Noisy shopper-like val / test queries at clean / mild / hard levels, with graded judgments."""
    return materialize(stages.query_sets, context, pipeline, mlflow)


ASSETS = [raw_catalog, validated_catalog, splits, query_sets]
CHECKS = [raw_catalog_checks]
