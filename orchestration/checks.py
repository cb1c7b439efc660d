"""Blocking asset checks beside the assets they guard: the catalog's validation rules on
raw_catalog (a failed error-severity rule stops everything downstream) and the new index's
recall against exact search on ann_index. Each only calls its stage module."""
from dagster import (AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue,
                     asset_check, multi_asset_check)

from data.validation import RULES
from orchestration.assets import run_shards
from orchestration.resources import PipelineConfig


@multi_asset_check(specs=[AssetCheckSpec(r.name, asset="raw_catalog", blocking=True, description=r.description)
                          for r in RULES])
def raw_catalog_checks(context: AssetCheckExecutionContext, pipeline: PipelineConfig):
    """Great Expectations rules (over the run's shards of a sharded catalog); a failed
    error-severity rule blocks everything downstream."""
    from pailitao.stages.data import check_raw_catalog

    params = pipeline.params()
    for o in check_raw_catalog(params, run_shards(context.op_execution_context, params)):
        yield AssetCheckResult(check_name=o.name, asset_key="raw_catalog", passed=o.passed,
                               severity=AssetCheckSeverity.ERROR if o.severity == "error"
                               else AssetCheckSeverity.WARN,
                               description=o.description, metadata={"details": MetadataValue.json(o.metadata)})


@asset_check(asset="ann_index", name="ann_index_recall", blocking=True,
             description="recall@k of the new index against exact search >= ann_index.min_recall")
def ann_index_recall(pipeline: PipelineConfig) -> AssetCheckResult:
    from pailitao.stages.retrieval import check_ann_index

    passed, desc, meta = check_ann_index(pipeline.params())
    return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.ERROR, description=desc,
                            metadata={k: MetadataValue.text(str(v)) for k, v in meta.items()})


CHECKS = [raw_catalog_checks, ann_index_recall]
