"""Embedding domain: base_model (packaged pretrained weights) -> stage1_embedder -> semantic_prototypes -> embedding_model, and the control
baseline_embedder (same backbone, same budget, contrastive only). Each runs one model stage."""
from orchestration.data_assets import query_sets, splits, stage_asset, validated_catalog
from pailitao import model_stages

GROUP = "embedding"
TRAINING = frozenset({"pytorch", "mlflow"})

base_model = stage_asset(model_stages.base_model, GROUP, deps=(validated_catalog, splits, query_sets),
                         kinds=frozenset({"pytorch", "mlflow"}))
stage1_embedder = stage_asset(model_stages.stage1_embedder, GROUP, deps=(base_model,), kinds=TRAINING)
semantic_prototypes = stage_asset(model_stages.semantic_prototypes, GROUP, deps=(stage1_embedder,),
                                  kinds=frozenset({"python", "mlflow"}))
embedding_model = stage_asset(model_stages.embedding_model, GROUP, deps=(semantic_prototypes,), kinds=TRAINING)
baseline_embedder = stage_asset(model_stages.baseline_embedder, GROUP, deps=(stage1_embedder,), kinds=TRAINING)

ASSETS = [base_model, stage1_embedder, semantic_prototypes, embedding_model, baseline_embedder]
