"""Runs that end badly: a stage killed by a signal, by SIGKILL (its MLflow run closed at the next
start, its training resumed into the same run, its temporary outputs cleared), and where the
artifacts of a run go when MLFLOW_TRACKING_URI names another store."""
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch

from core.config import REPO_ROOT, load_params
from core.io import atomic_path
from core.tracking import artifact_location, artifact_root, start_run


class Tiny(L.LightningModule):
    """A small regression trained through training.modules.fit (the embedding modules need data)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def training_step(self, batch, i):
        loss = self.w(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(work: str, hang: str = "-1") -> None:
    """A training stage as pailitao/stages/embedding.py runs one, in `work`; with `hang`, it prints
    "ready" after that step and waits to be killed (the tests run it so in a child process)."""
    from lightning.pytorch.loggers import MLFlowLogger

    from core.tracking import tracking_uri
    from training.modules import fit, run_id_file

    params = load_params("tiny", {"workdir": work})

    class Hang(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == int(hang):
                print("ready", flush=True)
                time.sleep(120)

    with start_run("stage1_embedder", params, log_params=False, run_id_file=run_id_file(work)) as run:
        torch.manual_seed(0)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=8)
        logger = MLFlowLogger(tracking_uri=tracking_uri(params), run_id=run.info.run_id)
        fit(Tiny(), data, params["train"], Path(work), 8, logger, [Hang()])


# stage processes that print "ready" and wait to be killed: one with its run open, one in the middle
# of writing its output (they import no torch: a quick start)
# SIGINT restored to Python's own handler: a child of a shell without job control (a background CI
# job) inherits it ignored, and then no signal would reach the run
OPEN_RUN = """import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from core.config import load_params
from core.tracking import start_run
with start_run("raw_catalog", load_params("tiny", {"workdir": sys.argv[1]}), log_params=False):
    print("ready", flush=True)
    time.sleep(120)
"""
WRITER = """import sys, time
from core.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "part.parquet").write_text("half written")
    print("ready", flush=True)
    time.sleep(120)
"""


def _child(func, *args) -> subprocess.Popen:
    """`func(*args)` of this module (or the code `func`) in a child process, once it printed "ready"."""
    code = func if isinstance(func, str) else \
        f"import sys; from tests.test_run_faults import {func.__name__} as f; f(*sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"the stage process did not get ready: {line}{proc.communicate()[1][-3000:]}")
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])   # the test's own store (mlflow_uri)


def _runs(stage: str) -> list:
    client = _client()
    return client.search_runs([client.get_experiment_by_name("pailitao").experiment_id],
                              f"tags.`pailitao.stage` = '{stage}'")


# ------------------------------------------------------------------ signals, exceptions, SIGKILL
@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, None)])
def test_a_signal_ends_the_run_killed(sig, rc, tmp_path, mlflow_uri):
    proc = _child(OPEN_RUN, tmp_path / "work")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and (rc is None or proc.returncode == rc), err[-3000:]
    [run] = _runs("raw_catalog")
    assert run.info.status == "KILLED" and run.info.end_time


def test_an_exception_ends_the_run_failed_and_the_handlers_are_put_back(make_params):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(ZeroDivisionError):
        with start_run("splits", make_params(), log_params=False):
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
            1 / 0
    assert {s: signal.getsignal(s) for s in before} == before
    [run] = _runs("splits")
    assert run.info.status == "FAILED"


def test_a_run_opened_off_the_main_thread_sets_no_handlers(make_params):
    params, errors = make_params(), []

    def body():
        try:
            with start_run("splits", params, log_params=False):
                pass
        except Exception as e:   # signal.signal raises ValueError off the main thread
            errors.append(e)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert not errors and [r.info.status for r in _runs("splits")] == ["FINISHED"]


def test_a_run_left_running_by_a_dead_process_is_closed_at_the_next_start(make_params, caplog):
    """Only when its process is known to be gone: alive, on another host or untagged, it stays."""
    params = make_params()
    with start_run("raw_catalog", params, log_params=False) as first:
        pass
    client, exp = _client(), first.info.experiment_id
    host = socket.gethostname()
    dead, alive, elsewhere, untagged = (
        client.create_run(exp, tags=tags, run_name="raw_catalog").info.run_id for tags in (
            {"pailitao.stage": "raw_catalog", "pailitao.host": host, "pailitao.pid": str(_dead_pid())},
            {"pailitao.stage": "raw_catalog", "pailitao.host": host, "pailitao.pid": str(os.getpid())},
            {"pailitao.stage": "raw_catalog", "pailitao.host": host + "-other", "pailitao.pid": str(_dead_pid())},
            {"pailitao.stage": "raw_catalog"}))
    other_stage = client.create_run(exp, tags={"pailitao.stage": "splits", "pailitao.host": host,
                                               "pailitao.pid": str(_dead_pid())}).info.run_id
    with caplog.at_level(logging.WARNING, "core.tracking"), start_run("raw_catalog", params, log_params=False):
        pass
    status = {r: client.get_run(r).info.status for r in (dead, alive, elsewhere, untagged, other_stage)}
    assert status == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING",
                      other_stage: "RUNNING"}
    assert [r.getMessage() for r in caplog.records if dead in r.getMessage() and "KILLED" in r.getMessage()]


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_a_training_killed_with_sigkill_resumes_into_the_same_mlflow_run(tmp_path, mlflow_uri, caplog):
    from training.modules import last_checkpoint

    work = tmp_path / "work"
    proc = _child(train, work, 5)   # checkpoints every 3 steps: last.ckpt is step 3's
    pid = proc.pid
    proc.kill()
    proc.wait()
    assert last_checkpoint(work) is not None and (work / "mlflow_run_id").is_file()
    [killed] = _runs("stage1_embedder")
    assert killed.info.status == "RUNNING" and killed.data.tags["pailitao.pid"] == str(pid)

    with caplog.at_level(logging.INFO, "core.tracking"):
        train(str(work))   # the second start, here: its log lines are caplog's
    [run] = _runs("stage1_embedder")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["pailitao.resumed"] == "1" and run.data.tags["pailitao.pid"] == str(os.getpid())
    assert any("closed as KILLED" in r.getMessage() and killed.info.run_id in r.getMessage() for r in caplog.records)
    steps = [m.step for m in _client().get_metric_history(run.info.run_id, "train/loss")]
    assert 0 in steps and max(steps) == 7 and steps.count(3) == 2   # both attempts; the second from step 3


# ------------------------------------------------------------------ temporary outputs of a killed stage
def test_the_next_write_removes_what_a_killed_writer_left_and_only_that(tmp_path, caplog):
    final = tmp_path / "raw_catalog"
    killed, running = _child(WRITER, final), _child(WRITER, final)
    killed.kill()
    killed.wait()
    legacy = tmp_path / ".raw_catalog.tmp-abcd1234"   # no owner in its name: cannot tell, left alone
    legacy.mkdir()
    temps = lambda: sorted(p.name for p in tmp_path.glob(".raw_catalog.tmp-*"))
    assert len(temps()) == 3
    try:
        with caplog.at_level(logging.WARNING, "core.io"), atomic_path(final) as tmp:
            tmp.mkdir()
        left = temps()
    finally:
        running.kill()
        running.wait()
    assert final.is_dir() and len(left) == 2 and legacy.name in left and any(f"-{running.pid}@" in n for n in left)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"removed {tmp_path}/.raw_catalog.tmp-") and f"by process {killed.pid} " in line


def test_an_old_copy_a_killed_writer_had_moved_aside_is_put_back(tmp_path):
    """Killed between moving the old output aside and renaming the new one in: the old one returns."""
    final = tmp_path / "splits"
    old = tmp_path / f".splits.old-{_dead_pid()}@{socket.gethostname()}"
    old.mkdir()
    (old / "splits.parquet").write_text("before")
    with pytest.raises(RuntimeError), atomic_path(final):
        raise RuntimeError("this write fails too")
    assert (final / "splits.parquet").read_text() == "before" and not old.exists()


# ------------------------------------------------------------------ where artifacts go
def test_artifacts_follow_the_tracking_store(tmp_path, monkeypatch):
    params = load_params("tiny")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the embedded sqlite store in the repo
    assert artifact_location(params) == artifact_root(params) == (REPO_ROOT / "mlflow/artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team.example:5000")
    assert artifact_location(params) is None                   # the server's own default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/team.db")
    assert artifact_location(params) == (tmp_path / "artifacts").as_uri()
    for choice, expected in (("s3://bucket/pailitao", "s3://bucket/pailitao"),
                             ("runs/artifacts", (REPO_ROOT / "runs/artifacts").as_uri())):
        said = load_params("tiny", {"mlflow": {"artifact_location": choice}})
        assert artifact_location(said) == expected


def test_a_run_on_a_tracking_server_keeps_its_artifacts_on_the_server(tmp_path, monkeypatch, make_params):
    from tests.conftest import free_port

    port, served = free_port(), tmp_path / "server-artifacts"
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen([Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", served.as_uri(),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        params = make_params({"mlflow": {"artifact_root": str(tmp_path / "laptop")}})
        with start_run("raw_catalog", params, log_params=False):
            mlflow.log_text("hello", "note.txt")
        exp = mlflow.MlflowClient(url).get_experiment_by_name("pailitao")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert [p.read_text() for p in served.rglob("note.txt")] == ["hello"] and not (tmp_path / "laptop").exists()
