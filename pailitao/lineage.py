"""The whole lineage in order, as plain stage functions (what `pailitao run` executes; the Dagster
job runs the same functions as assets). STAGES / LINEAGE import the stage modules (torch,
transformers, lightning: seconds) on first use; stage_help() reads the same registries from the
sources, so the CLI's parser and --help start without them."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import shutil
from functools import cache
from pathlib import Path

from pailitao.config import Paths
from pailitao.io import atomic_path, write_json

log = logging.getLogger(__name__)
# (module, stage registry) in lineage order: embedding_promotion decides the champion before the
# served index is built from it
REGISTRIES = (("pailitao.stages", "DATA_STAGES"), ("pailitao.model_stages", "MODEL_STAGES"),
              ("evaluation.ab_stages", "EVALUATION_STAGES"), ("retrieval.stages", "RETRIEVAL_STAGES"),
              ("retrieval.rerank_stages", "RERANK_STAGES"), ("evaluation.ab_stages", "REPORT_STAGES"))


@cache
def _stages() -> dict:
    return {k: v for mod, reg in REGISTRIES for k, v in getattr(importlib.import_module(mod), reg).items()}


def __getattr__(name: str):   # PEP 562: STAGES and LINEAGE load the stage modules when first asked for
    if name == "STAGES":
        return _stages()
    if name == "LINEAGE":
        return tuple(_stages())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def stage_help() -> dict[str, str]:
    """Stage name -> the first line of its function's docstring, in lineage order, parsed from the
    registries' source files (`NAME = {"stage": function, ...}`) without importing them."""
    out = {}
    for mod, reg in REGISTRIES:
        tree = ast.parse(Path(importlib.util.find_spec(mod).origin).read_text(encoding="utf-8"))
        funcs = {f.name: ast.get_docstring(f) or "" for f in tree.body if isinstance(f, ast.FunctionDef)}
        table = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == reg for t in n.targets))
        for key, value in zip(table.keys, table.values):
            out[key.value] = funcs[value.id].strip().splitlines()[0] if funcs.get(value.id) else ""
    return out


def run_lineage(params: dict, out: Path | None = None) -> dict:
    """Every stage in order; with `out`: OUT/summary.json (every stage's outputs), and the A/B
    report's OUT/metrics.json (every metric per variant and noise level, with intervals) and
    OUT/report.html."""
    results = {}
    for name, stage in _stages().items():
        log.info("stage %s", name)
        results[name] = stage(params).summary()
    summary = {"profile": params["profile"], "dataset": params["dataset"]["source"],
               "workdir": str(Paths.from_params(params).workdir), "stages": results}
    if out is not None:
        write_json(summary, Path(out) / "summary.json")
        report = Paths.from_params(params).asset("ab_report")
        for name in ("metrics.json", "report.html"):
            with atomic_path(Path(out) / name) as tmp:
                shutil.copyfile(report / name, tmp)
    return summary
