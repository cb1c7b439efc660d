"""MLflow Model Registry: an embedder checkpoint (transformers save_pretrained form) logged as a
pyfunc model whose predict() embeds rows of (image path, text), and registered under a name."""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EMBEDDER_NAMES = {"stage1_embedder": "pailitao-stage1-embedder",
                  "embedding_model": "pailitao-id-embedder",
                  "baseline_embedder": "pailitao-contrastive-embedder"}


class EmbedderModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with columns image (a path or empty) and text) -> [N, D] embeddings."""

    def load_context(self, context):
        from training.backbone import MLLMEmbedder

        self.embedder = MLLMEmbedder.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from PIL import Image

        images = [Image.open(p).convert("RGB") if isinstance(p, str) and p else None
                  for p in model_input.get("image", [None] * len(model_input))]
        texts = [t if isinstance(t, str) and t else None for t in model_input.get("text", [None] * len(model_input))]
        dim = (params or {}).get("dim")
        return self.embedder.encode(images, texts, dim=dim)


def log_embedder(model_dir: Path, stage: str) -> str:
    """Log the checkpoint to the active run and register it; returns the registered version."""
    return _log_and_register(EmbedderModel(), model_dir, EMBEDDER_NAMES[stage], [])


def _log_and_register(python_model, model_dir: Path, name: str, requirements: list[str]) -> str:
    """Log a pyfunc model to the active run and register it under `name`; returns the version.
    MLflow prints its registration chatter to stderr outside logging: it becomes one log line."""
    import contextlib
    import io

    import torch
    import transformers

    with contextlib.redirect_stderr(io.StringIO()):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=python_model, artifacts={"model": str(model_dir)},
            registered_model_name=name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"transformers=={transformers.__version__}", "pillow", "pandas", *requirements])
    version = str(info.registered_model_version)
    log.info("registered %s version %s", name, version)
    return version


RERANKER_NAMES = {"reranker_model": "pailitao-listwise-reranker", "reranker_pointwise": "pailitao-pointwise-reranker"}


class RerankerModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame: query_id, query_image, query_text, image, text, optionally score (the
    retrieval score, which a fused reranker needs for its fused order); one row per candidate in
    retrieval order) -> the same rows with rank (1 = best after reranking) and p_instance."""

    def load_context(self, context):
        from retrieval.rerank import load_reranker

        self.ranker = load_reranker(context.artifacts["model"])   # settings from its inference.json

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        val = lambda x: x if isinstance(x, str) and x else None  # noqa: E731
        out = []
        for _, g in model_input.groupby("query_id", sort=False):
            q = g.iloc[0]
            first = g["score"].astype(float).to_numpy() if "score" in g else None   # fused order when given
            ranked = self.ranker.rank((val(q["query_image"]), val(q["query_text"]), None),
                                      [(val(r["image"]), val(r["text"]), None) for _, r in g.iterrows()], first)
            rank = np.empty(len(g), dtype=int)
            rank[ranked.order] = np.arange(1, len(g) + 1)
            out.append(g.assign(rank=rank, p_instance=ranked.p_instance))
        return pd.concat(out) if out else model_input.assign(rank=[], p_instance=[])


def log_reranker(model_dir: Path, stage: str) -> str:
    """Log a reranker checkpoint to the active run and register it; returns the registered version."""
    return _log_and_register(RerankerModel(), model_dir, RERANKER_NAMES[stage], ["scikit-learn"])
