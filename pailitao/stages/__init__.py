"""The stage layer: one function per lineage node, grouped by domain (data, embedding, retrieval,
reranking, evaluation). Only this package writes asset directories, and it hands the libraries
the params sections they read (model resolution, the registry and the catalog source take the
whole params: they need paths, MLflow and serving together);
Dagster assets, DVC stages (`pailitao <stage>`) and `pailitao run` are thin callers of it, in the
order pailitao/lineage.py declares. Each stage writes its directory atomically, records one MLflow
run and returns a StageResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd

from core.io import atomic_path, exclusive, link_tree, read_json, write_json
from data.schema import SHARDS_DIR


@dataclass
class StageResult:
    """What a stage made: its directory and what Dagster metadata and the MLflow run show of it."""
    name: str
    path: Path
    metrics: dict = field(default_factory=dict)     # numbers: Dagster metadata and MLflow metrics
    info: dict = field(default_factory=dict)        # strings: Dagster metadata and MLflow tags
    markdown: dict = field(default_factory=dict)    # name -> markdown for the Dagster UI
    run_id: str | None = None

    def summary(self) -> dict:
        return {"path": str(self.path), "mlflow_run_id": self.run_id, **self.metrics, **self.info}


def md_table(df: pd.DataFrame, n: int = 10) -> str:
    return df.head(n).to_markdown(index=False) if len(df) else "_(empty)_"


def finish(res: StageResult, run) -> StageResult:
    """Record a stage's result in its (active) MLflow run and return it with the run id."""
    mlflow.log_metrics({k: float(v) for k, v in res.metrics.items()})
    mlflow.set_tags({f"pailitao.{k}": str(v)[:500] for k, v in res.info.items()})
    for name, text in res.markdown.items():
        mlflow.log_text(text, f"{name}.md")
    res.run_id = run.info.run_id
    return res


def ddp_worker(name: str, path: Path, rank: int) -> StageResult:
    """What a DDP worker (global rank > 0) returns: it trained its share; rank 0 recorded and wrote."""
    return StageResult(name, path, info={"rank": rank, "role": "ddp worker: rank 0 wrote the outputs"})


# ------------------------------------------------------------------------- sharded assets (data/shards.py)
def held_shards(root: Path) -> dict[str, dict]:
    """Shard -> its meta.json, for the shards a sharded asset directory holds now ({} if none)."""
    meta = root / "meta.json"
    names = read_json(meta).get("shards") or {} if meta.is_file() else {}
    return {n: read_json(root / SHARDS_DIR / n / "meta.json") for n in names
            if (root / SHARDS_DIR / n / "meta.json").is_file()}


def rebuild_shards(root: Path, order: list[str], keys: dict[str, str],
                   make: Callable[[str, Path, Path | None], None], union: Callable[[Path, list[str]], dict]
                   ) -> tuple[list[str], list[str]]:
    """Bring the sharded asset at `root` up to date, one writer at a time (core.io.exclusive), and
    swap its new version in whole (atomically). The new version holds the shards of `order` that
    have a key in `keys` or are held now, in that order (the others leave). A shard whose key differs
    from its held meta.json's `shard_key` is made again by make(name, its new dir, its previous dir
    or None), which writes that key into its meta.json; the rest are hard-linked from the current
    version (not read again). union(new root, names) returns the root's meta.json. Nothing is
    written when nothing changed. Returns (names, the shards made again)."""
    with exclusive(root):
        held = held_shards(root)
        names = [n for n in order if n in keys or n in held]
        built = [n for n in names if n in keys and held.get(n, {}).get("shard_key") != keys[n]]
        if built or list(held) != names:
            with atomic_path(root) as tmp:
                for name in names:
                    prev = root / SHARDS_DIR / name
                    if name in built:
                        make(name, tmp / SHARDS_DIR / name, prev if prev.is_dir() else None)
                    else:
                        link_tree(prev, tmp / SHARDS_DIR / name)
                write_json(union(tmp, names), tmp / "meta.json")
    return names, built


def shard_info(names: list[str], built: list[str], requested: list[str] | None = None) -> tuple[dict, dict]:
    """(metrics, info) a sharded stage adds to its StageResult: how many shards, which were (re)built."""
    info = {"shards": ",".join(names), "shards_built": ",".join(built) or "(none: all up to date)"}
    if requested is not None:
        info["shards_requested"] = ",".join(requested)
    return {"shard_count": len(names), "shards_built_count": len(built)}, info
