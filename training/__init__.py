"""Training: MLLM2vec backbone, prototype curation, margin head, losses, Lightning modules."""
