"""The console, shared by the CLI, the Dagster steps and the stage code: one line per event on stderr
(setup), library chatter silenced where it is made (quiet_libraries), tqdm bars with an ETA that
-q / PAILITAO_QUIET=1 and a non-terminal stderr turn off (progress and the training step bar), and a failed
command's full log on disk (logged_to)."""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

QUIET_ENV = "PAILITAO_QUIET"
# the project's own loggers print bare messages; a library's carry its logger name
OWN = ("core", "pailitao", "data", "training", "evaluation", "retrieval", "serving", "orchestration", "benchmarks",
       "__main__")
# library INFO loggers that talk at every start, quiet at WARNING (their warnings still show)
LEVELS = {"faiss.loader": logging.WARNING, "great_expectations": logging.WARNING, "alembic": logging.WARNING,
          "urllib3": logging.WARNING, "PIL": logging.WARNING, "milvus_lite": logging.WARNING,
          "pymilvus": logging.WARNING, "mlflow.store.db.utils": logging.WARNING}   # "Creating initial MLflow database tables..."
# (logger, message prefixes) dropped there: a library's notices at every fit, run or model save
_LIGHTNING_INFO = ("💡 Tip:", "GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped")
DROP = {"lightning.pytorch.utilities.rank_zero": _LIGHTNING_INFO,
        "lightning.fabric.utilities.rank_zero": _LIGHTNING_INFO,
        "lightning_utilities.core.rank_zero": _LIGHTNING_INFO,
        "lightning.fabric.utilities.seed": ("Seed set to",),
        "great_expectations.data_context.types.base": ("Created temporary directory",),
        "mlflow.pyfunc": ("Passing a Python object as `python_model`", "Failed to infer model signature")}
# (message regex, category) of warnings raised at every fit that the project cannot act on
WARNINGS = ((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),   # Lightning on torch >= 2.10
            (r"Found \d+ module\(s\) in eval mode at the start of training", Warning))  # frozen towers, on purpose
# libraries that add their own stderr handler yet propagate to the root: each line printed twice
OWN_HANDLERS = ("lightning", "huggingface_hub")


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_FILTERS = {name: _Drop(prefixes) for name, prefixes in DROP.items()}


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_libraries() -> None:
    """Silence the libraries' start-up and per-fit chatter at its source; idempotent, cheap to call
    again after a library is imported (a library's own handler is only there once it is)."""
    for name, level in LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name, f in _FILTERS.items():
        logging.getLogger(name).addFilter(f)   # no-op when already there
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # "Downloading artifacts" bars
    try:   # "Loading weights" / "Writing model shards" bars at every checkpoint load and save
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if any(getattr(h, "_pailitao", False) for h in logging.getLogger().handlers):
        for name in OWN_HANDLERS:   # the root's handler prints them: theirs would print each line again
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:   # exactly theirs: a plain stderr handler
                    lg.removeHandler(h)


class _Formatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.name == "py.warnings":   # "path:line: Category: message" without the source line under it
            record.message = record.message.strip().splitlines()[0]
        elif not record.name.startswith(OWN) and record.name != "root":
            record.message = f"{record.name}: {record.message}"
        return super().formatMessage(record)


def _printed_below(record: logging.LogRecord) -> bool:
    """Whether a library's own stderr handler on the way up from the record's logger printed it."""
    lg = logging.getLogger(record.name)
    while lg is not None and lg.parent is not None:   # the root is not below
        if any(type(h) is logging.StreamHandler and record.levelno >= h.level for h in lg.handlers):
            return True
        lg = lg.parent if lg.propagate else None
    return False


class _Handler(logging.Handler):
    """Writes to the current sys.stderr through tqdm.write: a log line above an active bar, not into it;
    a record a library's own handler has printed already is not printed again."""
    _pailitao = True

    def emit(self, record: logging.LogRecord) -> None:
        if _printed_below(record):
            return
        try:
            msg = self.format(record)
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup(quiet: bool = False, verbose: bool = False) -> None:
    """One handler on the root logger (replacing this module's earlier one), INFO (DEBUG with verbose)
    to stderr, WARNING and up only when quiet (or PAILITAO_QUIET=1, which quiet sets for child
    processes and the bars); warnings become one log line each; then quiet_libraries()."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_pailitao", False)]:
        root.removeHandler(h)
    handler = _Handler(logging.WARNING if is_quiet() else logging.NOTSET)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)   # a log file (logged_to) keeps INFO when quiet
    logging.captureWarnings(True)
    quiet_libraries()


def progress(iterable=None, desc: str | None = None, total: int | None = None, **kw):
    """tqdm with an ETA on stderr; off when quiet and when stderr is not a terminal (tqdm's
    disable=None), so logs and Dagster's captured output hold no bar fragments."""
    from tqdm.auto import tqdm

    disable = kw.pop("disable", None) or is_quiet() or None
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr, **kw)


def log_path(log_dir: Path, name: str) -> Path:
    return Path(log_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def logged_to(path: Path):
    """Everything logged while the block runs also goes to `path` (INFO and up, with logger names);
    an exception's full traceback is appended there before it propagates; a block that succeeds
    leaves no file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    except BaseException as e:
        root.removeHandler(handler)
        handler.close()
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(e)))
        raise
    else:
        root.removeHandler(handler)
        handler.close()
        path.unlink(missing_ok=True)


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (the rest is in the log)."""
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    text = lines[0].strip() + (" ..." if len(lines) > 1 else "") if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def numbers(values: dict, limit: int | None = None) -> str:
    """`items=5442, seconds=39.7`: the int and float values of `values` (booleans are not numbers),
    the first `limit` of them; floats to 4 significant digits."""
    nums = [(k, v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in nums[:limit])
