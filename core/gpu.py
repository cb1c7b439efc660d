"""The process's faiss GPU handles, one place for both users (the ANN index in retrieval/index.py
and the prototype KNN graph in training/head/knn_graph.py): whether faiss sees a GPU, and the one
StandardGpuResources (streams, temporary memory) every GPU index of the process shares."""
from __future__ import annotations

from functools import cache

import faiss


def faiss_gpu_available() -> bool:
    """faiss was built with GPU support (faiss-gpu-cu12) and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@cache
def gpu_resources():
    """The process's one faiss StandardGpuResources, made on first use."""
    return faiss.StandardGpuResources()
