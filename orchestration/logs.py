"""The console of `pailitao demo`: one line per stage event in the CLI's format, instead of Dagster's
colored DEBUG lines with run ids. Selected by the demo's run config (orchestration/launch.py); the
UI's runs keep Dagster's own console logger. It also sets up core/console.py in each step's
process, so a stage's own lines (items ingested, steps trained, recall) show as they do from
`pailitao run`."""
from __future__ import annotations

import logging

from dagster import InitLoggerContext, logger

from core import console

STAGE_EVENTS = {"STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "ASSET_MATERIALIZATION",
                "ASSET_CHECK_EVALUATION", "RUN_FAILURE"}


def key_numbers(metadata: dict, limit: int | None = 6) -> str:
    """The first numbers of a materialization's metadata: `items=5442, images=8096`."""
    return console.numbers({k: v.value for k, v in metadata.items()}, limit)


def event_line(record: logging.LogRecord) -> str | None:
    """The line for one Dagster record; None for what a user does not need (engine chatter)."""
    meta = getattr(record, "dagster_meta", None) or {}
    event, step = meta.get("dagster_event"), meta.get("step_key") or ""
    if event is None:   # an asset's own context.log line
        return meta.get("orig_message") if record.levelno >= logging.INFO else None
    kind, data = event.event_type_value, event.event_specific_data
    if kind not in STAGE_EVENTS:
        return None
    if kind == "STEP_START":
        return f"stage {step} started"
    if kind == "STEP_SUCCESS":
        return f"stage {step} done in {data.duration_ms / 1e3:.0f} s"
    if kind == "STEP_FAILURE":
        return f"stage {step} FAILED: {data.error.message.strip().splitlines()[-1] if data.error else ''}"
    if kind == "ASSET_MATERIALIZATION":
        mat = data.materialization
        return f"{mat.asset_key.to_user_string()}: {key_numbers(mat.metadata)}"
    if kind == "ASSET_CHECK_EVALUATION":   # a failed ERROR check stops what is downstream; a WARN one does not
        blocking = getattr(data.severity, "value", data.severity) == "ERROR"
        return None if data.passed else f"check {data.check_name} {'FAILED' if blocking else 'warns'}: {data.description}"
    return f"run FAILED: {meta.get('orig_message', '')}"


class _Lines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        line = event_line(record)
        if line is None:
            return False
        head = line.split(":")[0]
        level = (logging.ERROR if "FAILED" in head else logging.WARNING if head.endswith(" warns")
                 else max(record.levelno, logging.INFO))
        record.msg, record.args, record.name = line, (), "pailitao.dagster"
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return True


@logger(description="One line per stage event, in the format of the pailitao CLI.")
def stage_lines(init_context: InitLoggerContext) -> logging.Logger:
    console.setup()   # this step's process: our handler on the root logger, libraries quieted
    # DEBUG: Dagster logs most events at DEBUG; the filter keeps the ones a user needs.
    lg = logging.Logger(f"pailitao.dagster.{init_context.run_id}", logging.DEBUG)   # unregistered: no leak
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_pailitao", False))
    lg.addHandler(handler)
    lg.addFilter(_Lines())
    return lg
