"""The stage layer: one function per lineage node, grouped by domain (data, embedding, retrieval,
reranking, evaluation). Only this package writes asset directories, and it hands the libraries
the params sections they read (model resolution, the registry and the catalog source take the
whole params: they need paths, MLflow and serving together);
Dagster assets, DVC stages (`pailitao <stage>`) and `pailitao run` are thin callers of it, in the
order pailitao/lineage.py declares. Each stage writes its directory atomically, records one MLflow
run and returns a StageResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd


@dataclass
class StageResult:
    """What a stage made: its directory and what Dagster metadata and the MLflow run show of it."""
    name: str
    path: Path
    metrics: dict = field(default_factory=dict)     # numbers: Dagster metadata and MLflow metrics
    info: dict = field(default_factory=dict)        # strings: Dagster metadata and MLflow tags
    markdown: dict = field(default_factory=dict)    # name -> markdown for the Dagster UI
    run_id: str | None = None

    def summary(self) -> dict:
        return {"path": str(self.path), "mlflow_run_id": self.run_id, **self.metrics, **self.info}


def md_table(df: pd.DataFrame, n: int = 10) -> str:
    return df.head(n).to_markdown(index=False) if len(df) else "_(empty)_"


def finish(res: StageResult, run) -> StageResult:
    """Record a stage's result in its (active) MLflow run and return it with the run id."""
    mlflow.log_metrics({k: float(v) for k, v in res.metrics.items()})
    mlflow.set_tags({f"pailitao.{k}": str(v)[:500] for k, v in res.info.items()})
    for name, text in res.markdown.items():
        mlflow.log_text(text, f"{name}.md")
    res.run_id = run.info.run_id
    return res


def ddp_worker(name: str, path: Path, rank: int) -> StageResult:
    """What a DDP worker (global rank > 0) returns: it trained its share; rank 0 recorded and wrote."""
    return StageResult(name, path, info={"rank": rank, "role": "ddp worker: rank 0 wrote the outputs"})
