"""Resources injected into every asset: which params profile / dataset / workdir, and MLflow."""

import os

from dagster import ConfigurableResource

from core.config import dataset_override, deep_merge, load_params


class PipelineConfig(ConfigurableResource):
    """Selects the params.yaml profile, the dataset (a manifest dir, `synthetic` or `openclipart`)
    and where artifacts are written. Empty strings mean: as params.yaml says. `sets` holds the CLI's
    `--set key.path=value` overrides (checked against params.yaml like on the command line)."""

    profile: str = ""
    dataset: str = ""
    workdir: str = ""
    sets: list[str] = []

    def params(self, mlflow: "MlflowTracking | None" = None) -> dict:  # noqa: UP037
        overrides = dataset_override(self.dataset or None)
        if self.workdir:
            overrides = deep_merge(overrides, {"workdir": self.workdir})
        if mlflow is not None and mlflow.tracking_uri:
            overrides = deep_merge(overrides, {"mlflow": {"tracking_uri": mlflow.tracking_uri}})
        return load_params(self.profile or None, overrides, sets=self.sets)


class MlflowTracking(ConfigurableResource):
    """Where stage runs are tracked; empty = MLFLOW_TRACKING_URI or params.yaml (local sqlite)."""

    tracking_uri: str = ""


def default_resources() -> dict:
    return {"pipeline": PipelineConfig(profile=os.environ.get("PAILITAO_PROFILE", ""),
                                       dataset=os.environ.get("PAILITAO_DATASET", ""),
                                       workdir=os.environ.get("PAILITAO_WORKDIR", "")),
            "mlflow": MlflowTracking(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", ""))}
