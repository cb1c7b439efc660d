"""The lineage, declared once: every stage in run order with the stages it depends on, its domain
(the module in pailitao.stages and the Dagster group), the params.yaml sections it reads, its
Dagster kinds and whether it is partitioned by catalog shard. `pailitao run` executes it in this order, orchestration/assets.py builds the Dagster
assets from it, and dvc.yaml is generated from it (`pailitao lineage --dvc > dvc.yaml`; a test keeps
the file equal). Reading it imports no stage module: stage_function() imports one on first use,
and stage_help() parses the docstrings from source, so the CLI's parser starts without torch."""
from __future__ import annotations

import ast
import importlib
import logging
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from core.config import REPO_ROOT, Paths
from core.io import atomic_path, write_json

log = logging.getLogger(__name__)
TRAINING = frozenset({"pytorch", "mlflow"})


@dataclass(frozen=True)
class Stage:
    name: str
    domain: str                        # pailitao.stages.<domain>; the Dagster group
    deps: tuple[str, ...] = ()         # upstream stages
    params: tuple[str, ...] = ()       # params.yaml sections (under `base`) that DVC hashes
    kinds: frozenset = frozenset({"python", "parquet"})
    persist: bool = False              # DVC keeps the output between runs (versions accumulate)
    partitioned: bool = False          # one Dagster partition per catalog shard (data/shards.py)

    @property
    def module(self) -> str:
        return f"pailitao.stages.{self.domain}"


# run order: embedding_promotion decides the champion before the served index is built from it
LINEAGE: tuple[Stage, ...] = (
    Stage("raw_catalog", "data", (), ("seed", "dataset", "ingest", "validation"), partitioned=True),
    Stage("validated_catalog", "data", ("raw_catalog",), ("ingest", "validation"), partitioned=True),
    Stage("splits", "data", ("validated_catalog",), ("seed", "splits")),
    Stage("query_sets", "data", ("validated_catalog", "splits"), ("seed", "queries", "noise")),
    Stage("base_model", "embedding", ("validated_catalog", "splits", "query_sets"), ("seed", "model"), TRAINING),
    Stage("stage1_embedder", "embedding", ("base_model",), ("seed", "model", "train", "noise"), TRAINING),
    Stage("semantic_prototypes", "embedding", ("stage1_embedder",), ("seed", "prototypes"),
          frozenset({"python", "mlflow"})),
    Stage("embedding_model", "embedding", ("semantic_prototypes",), ("seed", "model", "train", "margin", "noise"),
          TRAINING),
    Stage("baseline_embedder", "embedding", ("stage1_embedder",), ("seed", "model", "train", "noise"), TRAINING),
    Stage("embedding_promotion", "evaluation", ("embedding_model", "baseline_embedder", "query_sets"),
          ("report", "promotion"), TRAINING),
    Stage("item_embeddings", "retrieval", ("validated_catalog", "embedding_promotion"), ("model", "serving"),
          frozenset({"pytorch", "numpy"}), partitioned=True),
    Stage("ann_index", "retrieval", ("item_embeddings",), ("ann_index",), frozenset({"faiss"}), persist=True),
    Stage("reranker_dataset", "reranking", ("item_embeddings", "query_sets"),
          ("seed", "model", "reranker", "serving", "queries", "noise"),
          frozenset({"pytorch", "parquet"})),
    Stage("reranker_model", "reranking", ("reranker_dataset",), ("seed", "reranker", "train"), TRAINING),
    Stage("reranker_pointwise", "reranking", ("reranker_dataset",), ("seed", "reranker", "train"), TRAINING),
    Stage("ab_report", "evaluation", ("embedding_promotion", "ann_index", "reranker_model", "reranker_pointwise"),
          ("report", "promotion", "serving"), frozenset({"html", "mlflow"})),
)
BY_NAME = {s.name: s for s in LINEAGE}
NAMES = tuple(BY_NAME)
# what a new catalog shard runs (the catalog_update job): it is ingested, validated and embedded
# alone, and a new index version is built over every shard's embeddings
CATALOG_UPDATE = tuple(s.name for s in LINEAGE if s.partitioned) + ("ann_index",)


def stage_function(name: str):
    """The stage function itself (imports its domain module: torch, lightning, faiss for most)."""
    return getattr(importlib.import_module(BY_NAME[name].module), name)


def domain_stages(domain: str) -> dict:
    """Stage name -> function for one domain's stages, in run order."""
    return {s.name: stage_function(s.name) for s in LINEAGE if s.domain == domain}


@cache
def _module_tree(module: str) -> ast.Module:
    return ast.parse(_source(module).read_text(encoding="utf-8"))


@cache
def stage_help() -> dict[str, str]:
    """Stage name -> the first line of its function's docstring, parsed from source (no import)."""
    out = {}
    for s in LINEAGE:
        fn = next(f for f in _module_tree(s.module).body if isinstance(f, ast.FunctionDef) and f.name == s.name)
        out[s.name] = (ast.get_docstring(fn) or "").strip().splitlines()[0]
    return out


# --------------------------------------------------------------------------------------- DVC
OWN_PACKAGES = ("core", "data", "training", "retrieval", "evaluation", "pailitao")


def _source(module: str) -> Path | None:
    """The project file defining `module` (found on disk: nothing is imported); None otherwise."""
    if module.split(".")[0] not in OWN_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


@cache
def code_files(module: str) -> tuple[str, ...]:
    """The project source files `module` runs: itself and everything it imports, transitively
    (package __init__ files left out). DVC hashes these, so an edit to any of them re-runs the
    stage, and the list cannot go stale."""
    seen, todo = set(), [module]
    while todo:
        mod = todo.pop()
        path = _source(mod)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        for node in ast.walk(_module_tree(mod)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            todo += [n for n in names if n.split(".")[0] in OWN_PACKAGES and _source(n) is not None]
    files = {_source(m).relative_to(REPO_ROOT).as_posix() for m in seen}
    return tuple(sorted(f for f in files if not f.endswith("__init__.py")))


def dvc_stages() -> dict:
    """dvc.yaml's `stages:` mapping: each stage calls `pailitao <stage>`, depends on its upstream
    outputs and its code, and hashes `profile`, `profiles` and its base sections."""
    out = {}
    for s in LINEAGE:
        stage_out = f"data/processed/{s.name}"
        out[s.name] = {
            "cmd": f"pailitao --params params.yaml {s.name}",
            "deps": [f"data/processed/{d}" for d in s.deps] + list(code_files(s.module)),
            "params": ["profile", "profiles"] + [f"base.{p}" for p in s.params],
            "outs": [{stage_out: {"persist": True}} if s.persist else stage_out]}
    return out


DVC_HEADER = """\
# Generated from pailitao/lineage.py by `pailitao lineage --dvc > dvc.yaml`: do not edit by hand
# (tests/test_lineage.py fails when it differs). Each stage calls `pailitao <stage>` (the venv's bin/
# must be on PATH: `make repro`). Every stage reads params.yaml; `profile` there picks the profile.
# ann_index persists: its versions accumulate and CURRENT moves atomically, so a running server
# never sees the directory vanish (DVC deletes non-persistent outputs before it runs a stage).
"""


def dvc_yaml() -> str:
    import yaml

    return DVC_HEADER + yaml.safe_dump({"stages": dvc_stages()}, sort_keys=False, default_flow_style=None, width=110)


# ------------------------------------------------------------------------------------ run
def run_lineage(params: dict, out: Path | None = None) -> dict:
    """Every stage in order; with `out`: OUT/summary.json (every stage's outputs), and the A/B
    report's OUT/metrics.json (every metric per variant and noise level, with intervals) and
    OUT/report.html."""
    results = {}
    for name in NAMES:
        log.info("stage %s", name)
        results[name] = stage_function(name)(params).summary()
    summary = {"profile": params["profile"], "dataset": params["dataset"]["source"],
               "workdir": str(Paths.from_params(params).workdir), "stages": results}
    if out is not None:
        write_json(summary, Path(out) / "summary.json")
        report = Paths.from_params(params).asset("ab_report")
        for name in ("metrics.json", "report.html"):
            with atomic_path(Path(out) / name) as tmp:
                shutil.copyfile(report / name, tmp)
    return summary
