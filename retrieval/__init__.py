"""Retrieval: ANN indexes (faiss, or Milvus) and their versioned publishing, query decoding, model resolution and the registry, batch embedding on Ray, the search pipeline and the rerankers."""
