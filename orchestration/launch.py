"""Run the lineage job against the local Dagster instance (DAGSTER_HOME, default .dagster/), so
`make demo` runs show up in the Dagster UI afterwards: each step in its own process (the job's
executor), or all in this one (in_process: quicker to start, for tests)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dagster import DagsterInstance
from rich.console import Console
from rich.table import Table

from orchestration.logs import key_numbers
from core.config import REPO_ROOT


def instance() -> DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(Path(__file__).with_name("dagster.yaml"), home / "dagster.yaml")
    return DagsterInstance.get()


def execute(profile: str | None = None, dataset: str | None = None, workdir: str | None = None,
            dagster_instance: DagsterInstance | None = None, in_process: bool = False,
            sets: list[str] | None = None):
    """The lineage run's result. Step processes take everything from the run config (they start
    from a fork server that may predate this call's environment), so the MLflow URI and the
    `--set key.path=value` overrides are in it too."""
    from dagster import execute_job, reconstructable

    from data.shards import partition_keys
    from orchestration.assets import sync_shards
    from orchestration.definitions import lineage
    from orchestration.resources import PipelineConfig

    config = {"profile": profile or "", "dataset": dataset or "", "workdir": workdir or "",
              "sets": list(sets or [])}
    dagster_instance = dagster_instance or instance()
    # one run over every catalog shard (the partitioned catalog assets take them all at once)
    tags = sync_shards(dagster_instance, partition_keys(PipelineConfig(**config).params()))
    run_config = {"resources": {"pipeline": {"config": config},
                                "mlflow": {"config": {"tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", "")}}},
                  "loggers": {"stage_lines": {}}}   # one line per stage event (orchestration/logs.py)
    if in_process:
        return lineage().execute_in_process(instance=dagster_instance, raise_on_error=False, run_config=run_config,
                                            tags=tags)
    return execute_job(reconstructable(lineage), instance=dagster_instance, run_config=run_config,
                       raise_on_error=False, tags=tags)


def decisions(result) -> str:
    """The run's closing lines: the A/B report's path, the champion decision and the rerank gate,
    each with its reasons ('' when the run made no ab_report)."""
    report = {ev.event_specific_data.materialization.asset_key.to_user_string(): ev.event_specific_data.materialization
              for ev in result.get_asset_materialization_events()}.get("ab_report")
    if report is None:
        return ""
    md = {k: v.value for k, v in report.metadata.items()}
    return (f"A/B report: {md['report']}\n"
            f"Champion decision: {md['decision']} ({md['reasons']})\n"
            f"Listwise reranker: {md['rerank_decision']} ({md['rerank_reasons']})")


def run_job(profile: str | None, dataset: str | None, sets: list[str] | None = None) -> int:
    result = execute(profile, dataset, sets=sets)
    console = Console()
    table = Table(title=f"Dagster run {result.run_id} ({'success' if result.success else 'FAILED'})")
    for col in ("asset", "path", "key numbers"):
        table.add_column(col)
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        table.add_row(mat.asset_key.to_user_string(), str(mat.metadata["path"].value if "path" in mat.metadata else ""),
                      key_numbers(mat.metadata, None))
    console.print(table)
    for ev in result.all_events:
        if ev.event_type_value == "ASSET_CHECK_EVALUATION":
            e = ev.event_specific_data
            if not e.passed:
                console.print(f"[yellow]check {e.check_name}: {e.description}[/yellow]")
    closing = decisions(result)
    if closing:
        console.print("\n" + closing)
    console.print("\nOpen the Dagster UI:  [bold]make ui[/bold]         -> http://127.0.0.1:3000 "
                  "(this run is in its Runs tab)\n"
                  "Open the MLflow UI:   [bold]make mlflow-ui[/bold]  -> http://127.0.0.1:5000\n"
                  "Open the search page: [bold]make serve[/bold]      -> http://127.0.0.1:8000")
    return 0 if result.success else 1
