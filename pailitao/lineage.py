"""The whole lineage in order, as plain stage functions (what `pailitao run` executes; the Dagster
job runs the same functions as assets)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from evaluation.ab_stages import EVALUATION_STAGES, REPORT_STAGES
from pailitao.config import Paths
from pailitao.io import atomic_path, write_json
from pailitao.model_stages import MODEL_STAGES
from pailitao.stages import DATA_STAGES
from retrieval.rerank_stages import RERANK_STAGES
from retrieval.stages import RETRIEVAL_STAGES

log = logging.getLogger(__name__)
# embedding_promotion decides the champion before the served index is built from it
STAGES = {**DATA_STAGES, **MODEL_STAGES, **EVALUATION_STAGES, **RETRIEVAL_STAGES, **RERANK_STAGES, **REPORT_STAGES}
LINEAGE = tuple(STAGES)


def run_lineage(params: dict, out: Path | None = None) -> dict:
    """Every stage in order; with `out`: OUT/summary.json (every stage's outputs), and the A/B
    report's OUT/metrics.json (every metric per variant and noise level, with intervals) and
    OUT/report.html."""
    results = {}
    for name in LINEAGE:
        log.info("stage %s", name)
        results[name] = STAGES[name](params).summary()
    summary = {"profile": params["profile"], "dataset": params["dataset"]["source"],
               "workdir": str(Paths.from_params(params).workdir), "stages": results}
    if out is not None:
        write_json(summary, Path(out) / "summary.json")
        report = Paths.from_params(params).asset("ab_report")
        for name in ("metrics.json", "report.html"):
            with atomic_path(Path(out) / name) as tmp:
                shutil.copyfile(report / name, tmp)
    return summary
