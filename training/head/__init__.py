"""The stage-3 ID-prototype margin head (sharded.py) with its KNN graph, collectives, row storage and cost model."""
from training.head.cost import head_cost
from training.head.knn_graph import build_index, knn_graph
from training.head.sharded import ShardedPrototypeHead

__all__ = ["ShardedPrototypeHead", "build_index", "head_cost", "knn_graph"]
