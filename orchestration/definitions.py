"""The one Dagster Definitions: `dagster dev -m orchestration.definitions` (make ui)."""
from dagster import AssetSelection, Definitions, define_asset_job

from orchestration import data_assets, evaluation_assets, model_assets, rerank_assets, retrieval_assets
from orchestration.resources import default_resources

# Runs the whole lineage; later domains add their assets to ASSETS and the job picks them up.
lineage_job = define_asset_job("lineage", selection=AssetSelection.all(),
                               description="Materialize the whole Pailitao-VL lineage with its checks.")

schedules, sensors, freshness_checks = evaluation_assets.schedule_and_sensors(lineage_job)

defs = Definitions(assets=data_assets.ASSETS + model_assets.ASSETS + evaluation_assets.ASSETS[:1]
                   + retrieval_assets.ASSETS + rerank_assets.ASSETS + evaluation_assets.ASSETS[1:],
                   asset_checks=data_assets.CHECKS + retrieval_assets.CHECKS + list(freshness_checks),
                   jobs=[lineage_job], schedules=schedules, sensors=sensors, resources=default_resources())
