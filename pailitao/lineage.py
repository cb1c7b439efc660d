"""The whole lineage in order, as plain stage functions (what `pailitao run` executes; the Dagster
job runs the same functions as assets)."""
from __future__ import annotations

import logging
from pathlib import Path

from pailitao.config import Paths
from pailitao.io import write_json
from pailitao.model_stages import MODEL_STAGES
from pailitao.stages import DATA_STAGES
from retrieval.rerank_stages import RERANK_STAGES
from retrieval.stages import RETRIEVAL_STAGES

log = logging.getLogger(__name__)
STAGES = {**DATA_STAGES, **MODEL_STAGES, **RETRIEVAL_STAGES, **RERANK_STAGES}
LINEAGE = tuple(STAGES)


def run_lineage(params: dict, out: Path | None = None) -> dict:
    """Every stage in order; writes OUT/summary.json when out is given."""
    results = {}
    for name in LINEAGE:
        log.info("stage %s", name)
        results[name] = STAGES[name](params).summary()
    summary = {"profile": params["profile"], "dataset": params["dataset"]["source"],
               "workdir": str(Paths.from_params(params).workdir), "stages": results}
    if out is not None:
        write_json(summary, Path(out) / "summary.json")
    return summary
