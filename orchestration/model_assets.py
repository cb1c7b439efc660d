"""Embedding domain: stage1_embedder -> semantic_prototypes -> embedding_model, and the control
baseline_embedder (same backbone, same budget, contrastive only). Bodies only call model_stages."""
from dagster import AssetExecutionContext, MaterializeResult, asset

from orchestration.data_assets import materialize
from orchestration.resources import MlflowTracking, PipelineConfig
from pailitao import model_stages

GROUP = "embedding"


@asset(group_name=GROUP, deps=["validated_catalog", "splits", "query_sets"], kinds={"pytorch", "mlflow"})
def stage1_embedder(context: AssetExecutionContext, pipeline: PipelineConfig,
                    mlflow: MlflowTracking) -> MaterializeResult:
    """Stage 1: MLLM2vec (Qwen2-VL family) with InfoNCE + mined hard negatives + Matryoshka."""
    return materialize(model_stages.stage1_embedder, context, pipeline, mlflow)


@asset(group_name=GROUP, deps=[stage1_embedder], kinds={"python", "mlflow"})
def semantic_prototypes(context: AssetExecutionContext, pipeline: PipelineConfig,
                        mlflow: MlflowTracking) -> MaterializeResult:
    """Stage 2: prototype library (seeds from catalog identity, organizer, reviewer)."""
    return materialize(model_stages.semantic_prototypes, context, pipeline, mlflow)


@asset(group_name=GROUP, deps=[semantic_prototypes], kinds={"pytorch", "mlflow"})
def embedding_model(context: AssetExecutionContext, pipeline: PipelineConfig,
                    mlflow: MlflowTracking) -> MaterializeResult:
    """Stage 3: ID recognition with an additive angular margin over KNN-sparse prototype negatives."""
    return materialize(model_stages.embedding_model, context, pipeline, mlflow)


@asset(group_name=GROUP, deps=[stage1_embedder], kinds={"pytorch", "mlflow"})
def baseline_embedder(context: AssetExecutionContext, pipeline: PipelineConfig,
                      mlflow: MlflowTracking) -> MaterializeResult:
    """The control arm: stage 1 continued contrastively for the stage-3 budget."""
    return materialize(model_stages.baseline_embedder, context, pipeline, mlflow)


ASSETS = [stage1_embedder, semantic_prototypes, embedding_model, baseline_embedder]
