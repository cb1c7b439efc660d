"""Reranking domain: reranker_dataset -> reranker_model (chunkwise listwise) and reranker_pointwise.
Bodies only call retrieval.rerank_stages."""
from orchestration.data_assets import query_sets, stage_asset
from orchestration.retrieval_assets import item_embeddings
from retrieval import rerank_stages

GROUP = "reranking"
TRAINING = frozenset({"pytorch", "mlflow"})

reranker_dataset = stage_asset(rerank_stages.reranker_dataset, GROUP, deps=(item_embeddings, query_sets),
                               kinds=frozenset({"pytorch", "parquet"}))
reranker_model = stage_asset(rerank_stages.reranker_model, GROUP, deps=(reranker_dataset,), kinds=TRAINING)
reranker_pointwise = stage_asset(rerank_stages.reranker_pointwise, GROUP, deps=(reranker_dataset,), kinds=TRAINING)

ASSETS = [reranker_dataset, reranker_model, reranker_pointwise]
