"""Retrieval domain: item_embeddings -> ann_index, and the blocking recall check on ann_index.
Bodies only call retrieval.stages."""
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from orchestration.data_assets import stage_asset, validated_catalog
from orchestration.evaluation_assets import embedding_promotion
from orchestration.resources import PipelineConfig
from retrieval import stages

GROUP = "retrieval"

# the served embedder is the champion embedding_promotion decided
item_embeddings = stage_asset(stages.item_embeddings, GROUP, deps=(validated_catalog, embedding_promotion),
                              kinds=frozenset({"pytorch", "numpy"}))
ann_index = stage_asset(stages.ann_index, GROUP, deps=(item_embeddings,), kinds=frozenset({"faiss"}))


@asset_check(asset=ann_index, name="ann_index_recall", blocking=True,
             description="recall@k of the new index against exact search >= ann_index.min_recall")
def ann_index_recall(pipeline: PipelineConfig) -> AssetCheckResult:
    passed, desc, meta = stages.check_ann_index(pipeline.params())
    return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.ERROR, description=desc,
                            metadata={k: MetadataValue.text(str(v)) for k, v in meta.items()})


ASSETS = [item_embeddings, ann_index]
CHECKS = [ann_index_recall]
