"""The console (core/console.py): library chatter silenced at its source, one handler and so one
line per event, bars off under quiet, and a failed stage's one line pointing at its full log."""
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from core import console
from pailitao.cli import main
from core.config import REPO_ROOT


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """setup() changes process-wide state: the root handler and level, PAILITAO_QUIET, captureWarnings."""
    monkeypatch.delenv(console.QUIET_ENV, raising=False)
    root = logging.getLogger()
    level = root.level
    yield
    for h in [h for h in root.handlers if getattr(h, "_pailitao", False)]:
        root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def ours() -> list:
    return [h for h in logging.getLogger().handlers if getattr(h, "_pailitao", False)]


def test_quiet_libraries_silences_the_faiss_loader_and_lightning_notices(caplog):
    console.quiet_libraries()
    logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=rank_zero.name):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("Restoring states from the checkpoint path at last.ckpt")   # not chatter: kept
    assert [r.getMessage() for r in caplog.records] == ["Restoring states from the checkpoint path at last.ckpt"]
    assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)
    assert logging.getLogger("faiss.loader").isEnabledFor(logging.WARNING)


def test_quiet_libraries_filters_the_two_fit_warnings_by_message_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_libraries()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use TreeSpec.is_leaf()", FutureWarning)
        warnings.warn("Found 186 module(s) in eval mode at the start of training. This may lead to ...",
                      UserWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation"]


def test_setup_twice_leaves_one_handler_and_one_line_per_event(capsys):
    console.setup()
    console.setup()
    assert len(ours()) == 1
    logging.getLogger("pailitao.test").info("stage raw_catalog")
    err = capsys.readouterr().err
    assert err.count("stage raw_catalog") == 1
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO +stage raw_catalog\n", err)


def test_registering_a_model_is_one_log_line_not_mlflow_prints(tmp_path, make_params, capsys):
    from retrieval.registry import EMBEDDER_NAMES, log_embedder
    from core.tracking import start_run

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    console.setup()
    capsys.readouterr()
    params = make_params()
    for _ in range(2):   # the second registration is the one MLflow prints "already exists" for
        with start_run("stage1_embedder", params, log_params=False):
            version = log_embedder(tmp_path / "ckpt", "stage1_embedder", params, "catalog-fp")
    lines = capsys.readouterr().err.splitlines()
    assert version == "2" and lines and all(re.match(r"\d\d:\d\d:\d\d INFO ", line) for line in lines), lines
    assert lines[-1].endswith(f"registered {EMBEDDER_NAMES['stage1_embedder']} version 2")


def test_a_library_with_its_own_stderr_handler_is_printed_once(capsys):
    console.setup()
    lib = logging.getLogger("console_test_lib")   # what lightning and huggingface_hub do at import
    lib.addHandler(logging.StreamHandler(sys.stderr))
    try:
        lib.warning("disk almost full")
        assert capsys.readouterr().err.count("disk almost full") == 1
    finally:
        lib.handlers.clear()


def test_quiet_shows_warnings_only_and_turns_the_bars_off(capsys, tmp_path):
    assert not console.is_quiet()
    console.setup(quiet=True)
    assert console.is_quiet()   # PAILITAO_QUIET=1: child processes and the bar helper see it
    logging.getLogger("pailitao.test").info("an info line")
    logging.getLogger("pailitao.test").warning("a warning line")
    err = capsys.readouterr().err
    assert "an info line" not in err and "a warning line" in err
    bar = console.progress(range(3), "encode", unit="batch")
    assert bar.disable and list(bar) == [0, 1, 2]
    with console.logged_to(tmp_path / "q.log"):   # the log file still gets INFO under quiet
        logging.getLogger("pailitao.test").info("kept in the file")
        assert "kept in the file" in (tmp_path / "q.log").read_text()
    assert not (tmp_path / "q.log").exists()   # a block that succeeds leaves no log


def test_quiet_env_alone_disables_the_bars(monkeypatch):
    monkeypatch.setenv(console.QUIET_ENV, "1")
    assert console.progress(range(2), "x").disable
    assert console.progress(None, "train", total=3, disable=None).disable   # how the fit's bar asks


def test_cli_quiet_flag(capsys):
    assert main(["-q", "params", "--profile", "tiny"]) == 0
    assert console.is_quiet() and ours()[0].level == logging.WARNING


def _failed_line(err: str) -> re.Match:
    lines = [s for s in err.splitlines() if " failed: " in s]
    assert len(lines) == 1, err
    m = re.fullmatch(r"pailitao (.+) failed: (\w+): (.+) \(full log: (.+)\)", lines[0])
    assert m, lines[0]
    return m


def test_a_failing_stage_ends_in_one_line_with_its_log(tmp_path, mlflow_uri, monkeypatch, capsys):
    def boom(params):
        raise RuntimeError("the splits exploded\nsecond line only in the log")

    monkeypatch.setattr("pailitao.stages.data.splits", boom)
    code = main(["splits", "--profile", "tiny", "--workdir", str(tmp_path / "w")])
    assert code == 1
    m = _failed_line(capsys.readouterr().err)
    assert m.groups()[:3] == ("splits", "RuntimeError", "the splits exploded ...")
    log = Path(m.group(4))
    assert log.is_file() and log.parent == tmp_path / "w" / "data" / "processed" / ".logs"
    text = log.read_text()
    assert "Traceback" in text and "second line only in the log" in text and "in boom" in text


def test_bad_input_fails_the_same_way_with_exit_2(tmp_path, mlflow_uri, capsys):
    """validated_catalog on a workdir with no raw catalog: a CatalogError, bad input (exit 2 as before)."""
    code = main(["validated_catalog", "--profile", "tiny", "--workdir", str(tmp_path / "w")])
    assert code == 2
    m = _failed_line(capsys.readouterr().err)
    assert m.group(1) == "validated_catalog" and m.group(2) == "CatalogError"
    assert "not a catalog directory" in m.group(3)
    assert "CatalogError" in Path(m.group(4)).read_text()


def test_run_names_the_stage_that_failed(tmp_path, mlflow_uri, monkeypatch, capsys):
    def boom(params):
        raise ValueError("no images")

    monkeypatch.setattr("pailitao.stages.data.raw_catalog", boom)
    assert main(["run", "--profile", "tiny", "--dataset", "synthetic", "--out", str(tmp_path / "o")]) == 1
    m = _failed_line(capsys.readouterr().err)
    assert m.groups()[:3] == ("run (stage raw_catalog)", "ValueError", "no images")
    assert Path(m.group(4)).is_file()


FIT = """
import logging, sys, tempfile
from core import console
console.setup()
import lightning as L, torch
from torch import nn
from training.modules import fit

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin, self.frozen = nn.Linear(4, 1), nn.Linear(4, 4).eval()   # a frozen tower: the eval-mode warning
    def training_step(self, batch, i):
        loss = self.lin(self.frozen(batch)).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.lin.parameters(), lr=0.1)

L.seed_everything(0)
logging.getLogger("lightning.pytorch.probe").info("PROBE before fit")
train = {"val_check_steps": 2, "precision": "32-true", "devices": 1, "num_nodes": 1, "strategy": "auto"}
fit(M(), torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=4), train, tempfile.mkdtemp(), 3)
logging.getLogger("lightning.pytorch.probe").info("PROBE after fit")
"""


def test_a_lightning_fit_prints_no_tips_warnings_or_double_lines():
    out = subprocess.run([sys.executable, "-c", FIT], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    for chatter in ("Tip:", "GPU available", "TPU available", "LeafSpec", "eval mode", "Seed set to",
                    "Loading faiss", "Epoch 0"):
        assert chatter not in err, err
    assert err.count("PROBE before fit") == 1 and err.count("PROBE after fit") == 1, err
