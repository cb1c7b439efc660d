"""MLflow Model Registry: embedder and reranker checkpoints (transformers save_pretrained form) logged
as pyfunc models and registered under a name.

The pyfuncs take what the search service takes: image bytes (a binary column, or base64 strings;
empty for none) decoded by the service's checked decoder, and text. Never a path: a served model
must not open files its caller names. Each version carries a signature, an input example, and tags
tying it to the run that made it (pailitao.profile, pailitao.catalog_fingerprint, pailitao.dim)
and to its checkpoint (pailitao.model_fingerprint: what an index built by it records as its
model_version), so a service can pair an index with the version that built it."""
from __future__ import annotations

import base64
import io
import logging
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from retrieval.models import EMBEDDER_NAMES, FINGERPRINT_TAG, RERANKER_NAMES, model_fingerprint

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ inputs
def _bad(row: int, message: str) -> MlflowException:
    """A bad row: `mlflow models serve` answers it 400 with the message."""
    return MlflowException(f"row {row}: {message}", INVALID_PARAMETER_VALUE)


def _image(value, limits, row: int):
    """One image cell -> an RGB image or None. bytes as they come (MLflow's server base64-decodes a
    binary column), a str as base64; then the checks and normalization of the service's uploads."""
    from retrieval.query import QueryError, decode_query_image

    if value is None or isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, str):
        try:
            value = base64.b64decode("".join(value.split()), validate=True)
        except ValueError:   # binascii.Error: not base64 (a path, say), which is never opened
            raise _bad(row, f"image must be image bytes or their base64, not {value[:60]!r}") from None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _bad(row, f"image must be image bytes or their base64, not {type(value).__name__}")
    try:
        return decode_query_image(bytes(value), limits) if len(value) else None
    except QueryError as e:
        raise _bad(row, str(e)) from None


def _rows(images, texts, limits, rows=None) -> tuple[list, list]:
    """(images, texts) of rows (numbered `rows` in errors), each with an image and/or a text, as
    the service requires of a query."""
    rows = range(len(images)) if rows is None else [int(r) for r in rows]
    ims = [_image(v, limits, r) for r, v in zip(rows, images)]
    txt = [(" ".join(t.split()) or None) if isinstance(t, str) else None for t in texts]
    for r, im, t in zip(rows, ims, txt):
        if im is None and t is None:
            raise _bad(r, "send an image and/or a text")
        if t and len(t) > limits.max_text_chars:
            raise _bad(r, f"text is {len(t)} characters; the limit is {limits.max_text_chars}")
    return ims, txt


def _column(df: pd.DataFrame, name: str) -> list:
    return df[name].tolist() if name in df else [None] * len(df)


class _Model(mlflow.pyfunc.PythonModel):
    limits: dict | None = None   # QueryLimits fields it was registered with (None in a pickle from before)

    def _limits(self):
        from retrieval.query import QueryLimits

        return QueryLimits(**(self.limits or {}))


# ------------------------------------------------------------------------------------------ models
class EmbedderModel(_Model):
    """predict(DataFrame: image (bytes or base64; empty for none), text) -> float32 [N, dim]
    embeddings; dim is the served dim it was registered with unless params {"dim": d} say otherwise."""

    dim: int | None = None

    def __init__(self, dim: int | None = None, limits: dict | None = None):
        self.dim, self.limits = dim, limits

    def load_context(self, context):
        from training.backbone import MLLMEmbedder

        self.embedder = MLLMEmbedder.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        images, texts = _rows(_column(model_input, "image"), _column(model_input, "text"), self._limits())
        return self.embedder.encode(images, texts, dim=(params or {}).get("dim") or self.dim)


class RerankerModel(_Model):
    """predict(DataFrame: query_id, query_image, query_text, image, text, optionally score (the
    retrieval score, which a fused reranker needs for its fused order); one row per candidate in
    retrieval order; images as bytes or base64) -> DataFrame query_id, rank (1 = best after
    reranking), p_instance, row for row."""

    def __init__(self, limits: dict | None = None):
        self.limits = limits

    def load_context(self, context):
        from retrieval.rerank import load_reranker

        self.ranker = load_reranker(context.artifacts["model"])   # settings from its inference.json

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        df, limits = model_input.reset_index(drop=True), self._limits()
        rank, p = np.zeros(len(df), dtype=np.int64), np.zeros(len(df))
        for idx in df.groupby("query_id", sort=False).indices.values():
            g = df.iloc[idx]
            q_im, q_text = _rows(_column(g, "query_image")[:1], _column(g, "query_text")[:1], limits, idx[:1])
            ims, texts = _rows(_column(g, "image"), _column(g, "text"), limits, idx)
            first = g["score"].astype(float).to_numpy() if "score" in g else None   # fused order when given
            ranked = self.ranker.rank((q_im[0], q_text[0], None), [(im, t, None) for im, t in zip(ims, texts)], first)
            rank[idx[ranked.order]] = np.arange(1, len(idx) + 1)
            p[idx] = ranked.p_instance
        return pd.DataFrame({"query_id": df["query_id"].astype(str), "rank": rank, "p_instance": p})


# ------------------------------------------------------------------------------------------ logging
def _example_image() -> bytes:
    """A small real image, PNG-encoded: a red mug on white (the input examples' photo)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (48, 48), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([12, 12, 32, 40], fill=(200, 30, 30), outline="black")
    d.arc([26, 18, 40, 32], -90, 90, fill="black", width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def log_embedder(model_dir: Path, stage: str, params: dict, catalog_fingerprint: str) -> str:
    """Log the checkpoint to the active run and register it, tagged with the profile, the served
    dim and the catalog it was trained on; returns the registered version."""
    from retrieval.query import QueryLimits

    dim = int(params["model"]["served_dim"])
    photo = _example_image()
    signature = ModelSignature(Schema([ColSpec("binary", "image", required=False),
                                       ColSpec("string", "text", required=False)]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
                               ParamSchema([ParamSpec("dim", "long", dim)]))
    example = pd.DataFrame({"image": [photo, b""], "text": ["red mug", "red mug"]})   # b"": text only
    return _log_and_register(EmbedderModel(dim, asdict(QueryLimits.from_params(params))), model_dir,
                             EMBEDDER_NAMES[stage], [], signature, example,
                             {**_origin(params, stage), "pailitao.catalog_fingerprint": catalog_fingerprint,
                              "pailitao.dim": str(dim)})


def log_reranker(model_dir: Path, stage: str, params: dict, dataset_fingerprint: str) -> str:
    """Log a reranker checkpoint to the active run and register it; returns the registered version."""
    from retrieval.query import QueryLimits

    photo = _example_image()
    signature = ModelSignature(
        Schema([ColSpec("string", "query_id"), ColSpec("binary", "query_image", required=False),
                ColSpec("string", "query_text", required=False), ColSpec("binary", "image", required=False),
                ColSpec("string", "text", required=False), ColSpec("double", "score", required=False)]),
        Schema([ColSpec("string", "query_id"), ColSpec("long", "rank"), ColSpec("double", "p_instance")]))
    example = pd.DataFrame({"query_id": ["q1", "q1"], "query_image": [photo, photo], "query_text": ["", ""],
                            "image": [photo, b""], "text": ["red mug", "blue hat"], "score": [0.9, 0.4]})
    return _log_and_register(RerankerModel(asdict(QueryLimits.from_params(params))), model_dir,
                             RERANKER_NAMES[stage], ["scikit-learn"], signature, example,
                             {**_origin(params, stage), "pailitao.dataset_fingerprint": dataset_fingerprint})


def _origin(params: dict, stage: str) -> dict:
    return {"pailitao.profile": params.get("profile") or "", "pailitao.stage": stage}


def _log_and_register(python_model, model_dir: Path, name: str, requirements: list[str], signature,
                      example: pd.DataFrame, tags: dict) -> str:
    """Log a pyfunc model to the active run and register it under `name`, the version tagged with
    `tags` and its checkpoint's fingerprint; returns the version. MLflow prints its registration
    chatter to stderr outside logging: it becomes one log line."""
    import contextlib

    import torch
    import transformers


    tags = {**{k: v for k, v in tags.items() if v}, FINGERPRINT_TAG: model_fingerprint(model_dir)}
    with contextlib.redirect_stderr(io.StringIO()):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=python_model, artifacts={"model": str(model_dir)},
            signature=signature, input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"transformers=={transformers.__version__}", "pillow", "pandas", *requirements])
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    log.info("registered %s version %s", name, version)
    return version
