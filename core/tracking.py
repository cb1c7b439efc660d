"""The one MLflow helper every stage uses: a run tagged with the stage, profile, Dagster run id,
git commit and dataset fingerprint, with the params flattened, in the local sqlite store by default.
A run never stays RUNNING after its process ended: a caught signal ends it KILLED, an exception
FAILED, and a process killed outright (SIGKILL, OOM, eviction) has its run closed KILLED at the
next start of the same stage."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

from core.config import REPO_ROOT, resolve
from core.io import process_gone

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"
logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(params: dict) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path in params is taken from the repo root."""
    uri = _resolved(params, os.environ.get("MLFLOW_TRACKING_URI") or params["mlflow"]["tracking_uri"])
    if uri.startswith(SQLITE):
        Path(uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _resolved(params: dict, uri: str) -> str:
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/"):
        return SQLITE + str(resolve(params, uri[len(SQLITE):]))
    return uri


def artifact_root(params: dict) -> str:
    return resolve(params, params["mlflow"]["artifact_root"]).as_uri()


def artifact_location(params: dict, uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts; the rule (params.yaml mlflow.artifact_location):
    - a path or URI there: that, for every store;
    - auto, the sqlite store params name (by default the embedded one in the repo): artifact_root;
    - auto, another sqlite file (from MLFLOW_TRACKING_URI): artifacts/ beside it (no server to
      choose, and MLflow's fallback is ./mlruns under whatever the working directory is);
    - auto, anything else (an http(s) tracking server, ...): None, the server's default artifact
      root, so a team's server never gets runs whose artifacts live on one laptop."""
    choice = params["mlflow"].get("artifact_location", "auto")
    if choice != "auto":
        return choice if "://" in str(choice) else resolve(params, choice).as_uri()
    uri = uri or tracking_uri(params)
    if not uri.startswith(SQLITE):
        return None
    if uri == _resolved(params, params["mlflow"]["tracking_uri"]):
        return artifact_root(params)
    return (Path(uri[len(SQLITE):]).parent / "artifacts").as_uri()


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
    root = artifact_location(params, mlflow.get_tracking_uri())
    return mlflow.create_experiment(name, artifact_location=root and f"{root.rstrip('/')}/{name}")


STAGE, HOST, PID, RESUMED = "pailitao.stage", "pailitao.host", "pailitao.pid", "pailitao.resumed"


def close_stale_runs(client, experiment: str, stage: str) -> list[str]:
    """RUNNING runs of `stage` whose process is gone (SIGKILL, OOM, eviction: nothing could end
    them) are closed KILLED. A run of another host, or one without pid/host tags, is left alone:
    its process cannot be checked from here."""
    closed = []
    for run in client.search_runs([experiment], f"tags.`{STAGE}` = '{stage}' and attributes.status = 'RUNNING'"):
        host, pid = run.data.tags.get(HOST), run.data.tags.get(PID)
        if pid and process_gone(host, int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning("MLflow run %s (%s) was left RUNNING by process %s on %s, which is gone: closed as KILLED",
                        run.info.run_id, stage, pid, host)
            closed.append(run.info.run_id)
    return closed


def _run_to_continue(client, run_id_file: Path | None, experiment: str):
    """The run whose id a killed training left in `run_id_file`, when it can be continued here."""
    if run_id_file is None or not run_id_file.is_file():
        return None
    from mlflow.exceptions import MlflowException

    run_id = run_id_file.read_text().strip()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.experiment_id != experiment or run.info.lifecycle_stage != "active":
        log.warning("MLflow run %s (from %s) is not in this store and experiment: a new run", run_id, run_id_file)
        return None
    return run


@contextlib.contextmanager
def _signals_caught() -> Iterator[list[int]]:
    """SIGTERM/SIGINT while a run is open are noted, then handled as before (KeyboardInterrupt,
    Dagster's own handler, or exit 128+n) so the run ends KILLED while the stack unwinds; ending it
    inside the handler could re-enter a store call the signal interrupted. Only the main thread
    can set handlers; the previous ones are back afterwards."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def note(signum, frame):
        caught.append(signum)
        handler = previous[signum]
        if callable(handler):
            return handler(signum, frame)
        raise SystemExit(128 + signum)

    for s, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(s, note)
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def start_run(stage: str, params: dict, dataset_fingerprint: str | None = None,
              dagster_run_id: str | None = None, log_params: bool = True,
              run_id_file: Path | None = None) -> Iterator["mlflow.ActiveRun"]:
    """Open an MLflow run for one lineage stage; metrics and artifacts logged inside land in it.
    It ends FINISHED, FAILED on an exception, KILLED on SIGTERM/SIGINT. With `run_id_file` (beside
    a training's checkpoints) the run id is kept there, and a run it names is continued, tagged
    pailitao.resumed=N: a training resumed after a kill stays one MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    client = mlflow.MlflowClient()
    experiment = experiment_id(params)
    close_stale_runs(client, experiment, stage)
    commit = git_commit()
    tags = {STAGE: stage, "pailitao.profile": params.get("profile", ""),
            "pailitao.dataset.source": params["dataset"]["source"],
            "dagster.run_id": dagster_run_id or os.environ.get("DAGSTER_RUN_ID", "none"),
            "git.commit": commit, "mlflow.source.git.commit": commit,
            HOST: socket.gethostname(), PID: str(os.getpid())}   # for close_stale_runs
    if dataset_fingerprint:
        tags["pailitao.dataset.fingerprint"] = dataset_fingerprint
    previous = _run_to_continue(client, run_id_file, experiment)
    if previous is not None:
        tags[RESUMED] = str(int(previous.data.tags.get(RESUMED, 0)) + 1)
    with _signals_caught() as caught:
        run = mlflow.start_run(run_id=previous and previous.info.run_id, experiment_id=experiment,
                               run_name=stage, tags=tags)
        try:
            if run_id_file is not None:
                run_id_file.parent.mkdir(parents=True, exist_ok=True)
                run_id_file.write_text(run.info.run_id)
            if log_params:
                flat = flatten({k: v for k, v in params.items() if k != "profiles"})
                if previous is not None:   # MLflow params are write-once: a resumed run keeps its first values
                    flat = {k: v for k, v in flat.items() if k not in previous.data.params}
                mlflow.log_params(flat)
            log.info("MLflow run %s (%s%s) at %s", run.info.run_id, stage,
                     f", resumed {tags[RESUMED]}x" if previous is not None else "", mlflow.get_tracking_uri())
            yield run
        except BaseException:
            mlflow.end_run("KILLED" if caught else "FAILED")
            raise
        mlflow.end_run()
