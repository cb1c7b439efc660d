"""The one MLflow helper every stage uses: a run tagged with the stage, profile, Dagster run id,
git commit and dataset fingerprint, with the params flattened, in the local sqlite store by default."""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

from pailitao.config import REPO_ROOT, resolve

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(params: dict) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path in params is taken from the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params["mlflow"]["tracking_uri"]
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        db = resolve(params, uri[len(prefix):])
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def artifact_root(params: dict) -> str:
    return resolve(params, params["mlflow"]["artifact_root"]).as_uri()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("-dirty" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def experiment_id(params: dict) -> str:
    import mlflow

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or params["mlflow"]["experiment"]
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_root(params) + "/" + name)


@contextlib.contextmanager
def start_run(stage: str, params: dict, dataset_fingerprint: str | None = None,
              dagster_run_id: str | None = None, log_params: bool = True) -> Iterator["mlflow.ActiveRun"]:
    """Open an MLflow run for one lineage stage; metrics and artifacts logged inside land in it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    commit = git_commit()
    tags = {"pailitao.stage": stage, "pailitao.profile": params.get("profile", ""),
            "pailitao.dataset.source": params["dataset"]["source"],
            "dagster.run_id": dagster_run_id or os.environ.get("DAGSTER_RUN_ID", "none"),
            "git.commit": commit, "mlflow.source.git.commit": commit}
    if dataset_fingerprint:
        tags["pailitao.dataset.fingerprint"] = dataset_fingerprint
    with mlflow.start_run(experiment_id=experiment_id(params), run_name=stage, tags=tags) as run:
        if log_params:
            mlflow.log_params(flatten({k: v for k, v in params.items() if k != "profiles"}))
        log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, mlflow.get_tracking_uri())
        yield run
