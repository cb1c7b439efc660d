"""The one Dagster Definitions: `dagster dev -m orchestration.definitions` (make ui)."""
from dagster import (AssetSelection, Definitions, JobDefinition, colored_console_logger, define_asset_job,
                     multiprocess_executor)

from core.console import quiet_libraries

quiet_libraries()   # before the assets import faiss, mlflow, lightning; the step processes fork from here

from orchestration import assets, automation, checks
from orchestration.logs import stage_lines
from orchestration.resources import default_resources
from pailitao.lineage import CATALOG_UPDATE

# Each step in its own process, one at a time: a finished asset hands all its memory back (in one
# process the demo lineage peaked at 9-14 GB though no asset alone needs 4.5 GB), and two model
# stages never share the 2 cores. Processes fork from a server that has imported the lineage once.
STEP_EXECUTOR = multiprocess_executor.configured(
    {"max_concurrent": 1, "start_method": {"forkserver": {"preload_modules": ["orchestration.definitions"]}}},
    name="one_step_per_process")

# Runs the whole lineage (every asset pailitao/lineage.py declares).
lineage_job = define_asset_job("lineage", selection=AssetSelection.all(), executor_def=STEP_EXECUTOR,
                               description="Materialize the whole Pailitao-VL lineage with its checks.")

# A new or changed catalog shard (one partition): ingested, validated and embedded alone, then a new
# index version over every shard's embeddings (the models are not retrained: that is the schedule's).
catalog_update_job = define_asset_job(
    "catalog_update", selection=AssetSelection.assets(*CATALOG_UPDATE), executor_def=STEP_EXECUTOR,
    partitions_def=assets.CATALOG_SHARDS,
    description="Ingest, validate and embed the selected catalog shards, then publish a new index version.")

schedules, sensors, freshness_checks = automation.schedule_and_sensors(lineage_job, catalog_update_job)

defs = Definitions(assets=assets.ASSETS, asset_checks=checks.CHECKS + list(freshness_checks),
                   jobs=[lineage_job, catalog_update_job], schedules=schedules, sensors=sensors, resources=default_resources(),
                   loggers={"console": colored_console_logger, "stage_lines": stage_lines})


def lineage() -> JobDefinition:
    """The lineage job from a module-level function: what dagster.reconstructable needs to rebuild
    it in each step's process (orchestration.launch)."""
    return defs.resolve_job_def("lineage")
