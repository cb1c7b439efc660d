"""Retrieval: faiss ANN index (choose, build, recall check, versioned atomic publish, reader)."""
