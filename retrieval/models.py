"""Which model serves, and loading it: the embedder a params file names (a lineage stage, the
registry's champion, or a directory), the checkpoint that built a published index, and the
reranker serving.rerank asks for. The one place the service, the CLI and the stages resolve
models; MLflow is imported only when the registry is asked."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from core.config import Paths, resolve
from core.io import atomic_path, read_json

log = logging.getLogger(__name__)

LINEAGE_MODELS = ("embedding_model", "baseline_embedder", "stage1_embedder")
CHAMPION, PROMOTABLE = "champion", ("embedding_model", "baseline_embedder")
EMBEDDER_NAMES = {"stage1_embedder": "pailitao-stage1-embedder",
                  "embedding_model": "pailitao-id-embedder",
                  "baseline_embedder": "pailitao-contrastive-embedder"}
RERANKER_NAMES = {"reranker_model": "pailitao-listwise-reranker", "reranker_pointwise": "pailitao-pointwise-reranker"}
FINGERPRINT_TAG = "pailitao.model_fingerprint"


class NothingToServe(FileNotFoundError):
    """No published index, or no checkpoint (here or in the registry) that built it: a service
    cannot start. A FileNotFoundError, so the CLI says it in one line with exit code 2."""


@dataclass(frozen=True)
class ModelInfo:
    name: str           # embedding_model, baseline_embedder, ... or the directory given
    source: str         # models:/<registered>@<alias> or the local directory
    path: str           # the checkpoint directory loaded
    fingerprint: str    # model_fingerprint(path): what an index records as its model_version


def model_fingerprint(path: str | Path) -> str:
    """A content hash of a checkpoint directory that survives copies (an MLflow download): config
    files in full, and of every weight file its size plus its first and last MiB (hashing a
    16 GB checkpoint in full would take a minute at every start)."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(2**20))
                fh.seek(max(0, size - 2**20))
                h.update(fh.read(2**20))
    return h.hexdigest()[:16]


def _download(params: dict, name: str, version: str) -> Path:
    """The checkpoint directory of models:/name/version, downloaded once into data/processed/.registry/."""
    import mlflow

    from core.tracking import tracking_uri

    dest = Paths.from_params(params).processed / ".registry" / f"{name}-v{version}"
    if not (dest / "artifacts" / "model").is_dir():
        mlflow.set_tracking_uri(tracking_uri(params))
        with atomic_path(dest) as tmp:
            tmp.mkdir(parents=True)
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
    return dest / "artifacts" / "model"


def _registry_dir(params: dict, model: str, alias: str | None) -> tuple[Path, str] | None:
    """(checkpoint dir, models:/ uri) of <registered name of model>@alias; None when there is no
    such registered model or alias."""
    name = EMBEDDER_NAMES.get(model)
    if not alias or not name:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from core.tracking import tracking_uri

    try:
        version = mlflow.MlflowClient(tracking_uri(params)).get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None   # no such registered model or alias: serve the lineage's checkpoint
    return _download(params, name, str(version)), f"models:/{name}@{alias} (version {version})"


def resolve_model(params: dict, model: str | None = None) -> ModelInfo:
    """The embedder to serve: `model` (default params serving.model) is `champion` (the registered
    embedder holding that alias, else serving.fallback_model), a lineage stage name or a local
    checkpoint directory. For a stage, the registered model's `serving.registry_alias`
    (champion) wins when it exists, else data/processed/<stage>/model. item_embeddings resolves
    through here, so the index is built by the model that embeds queries; a service serves an
    index through pair_with_index, as the champion may since have moved to another run's model."""
    model = model or params["serving"]["model"]
    if model == CHAMPION:   # whichever embedder the promotion gate made champion (evaluation/promotion.py)
        for stage in PROMOTABLE:
            found = _registry_dir(params, stage, params["serving"].get("registry_alias") or CHAMPION)
            if found:
                return ModelInfo(stage, found[1], str(found[0]), model_fingerprint(found[0]))
        model = params["serving"]["fallback_model"]   # nothing promoted yet
    if model in LINEAGE_MODELS:
        found = _registry_dir(params, model, params["serving"].get("registry_alias"))
        if found:
            path, source = found
        else:
            path = Paths.from_params(params).asset(model) / "model"
            source = str(path)
    else:
        path = resolve(params, model)
        source = str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {model!r}: checkpoint directory {path} not found "
                                f"(run `pailitao {model}` first)" if model in LINEAGE_MODELS else
                                f"model directory {path} not found")
    return ModelInfo(model, str(source), str(path), model_fingerprint(path))


def model_by_fingerprint(params: dict, fp: str) -> ModelInfo | None:
    """The checkpoint whose fingerprint is `fp` (what an index records as its model_version): a
    lineage stage's own, else the newest registered embedder version tagged with it; None if none."""
    paths = Paths.from_params(params)
    for stage in LINEAGE_MODELS:
        path = paths.asset(stage) / "model"
        if path.is_dir() and model_fingerprint(path) == fp:
            return ModelInfo(stage, str(path), str(path), fp)
    if not fp.isalnum():   # it goes into a registry filter; an index from before fingerprints has ""
        return None
    import mlflow

    from core.tracking import tracking_uri

    stages = {name: stage for stage, name in EMBEDDER_NAMES.items()}
    tagged = [v for v in mlflow.MlflowClient(tracking_uri(params)).search_model_versions(
        f"tags.`{FINGERPRINT_TAG}` = '{fp}'") if v.name in stages]
    if not tagged:
        return None
    v = max(tagged, key=lambda v: int(v.version))
    path = _download(params, v.name, str(v.version))
    return ModelInfo(stages[v.name], f"models:/{v.name}/{v.version}", str(path), model_fingerprint(path))


def published_meta(index_dir: str | Path) -> dict:
    """meta.json of the index version CURRENT names; FileNotFoundError when nothing is published."""
    from retrieval.index_store import current_version

    return read_json(Path(index_dir) / "versions" / current_version(index_dir) / "meta.json")


def pair_with_index(params: dict, model: str | None, index_dir: str | Path) -> tuple[ModelInfo, int]:
    """(embedder, dim) that serve the published index in index_dir: the index's dim, and the model
    `model` resolves to only when it built the index, else the checkpoint that did (a lineage
    stage's, or the registered version tagged with its fingerprint): the registry's champion may
    come from a run on another catalog or profile, and an index is only searchable by its own model.
    NothingToServe (one line, naming the command that fixes it) when there is no such pair."""
    paths, profile = Paths.from_params(params), params.get("profile") or "demo"
    lineage = Path(index_dir) == paths.asset("ann_index")
    try:
        meta = published_meta(index_dir)
    except (FileNotFoundError, ValueError) as e:
        make = (f"`pailitao run --profile {profile} --out {paths.workdir}`" if lineage else
                f"`pailitao ab build --profile {profile} --workdir {paths.workdir}`")
        raise NothingToServe(f"nothing to serve: {e}; make one with {make}") from None
    dim, built_by = int(meta["dim"]), meta.get("model_version") or ""
    try:
        info, why = resolve_model(params, model), ""
    except FileNotFoundError as e:
        info, why = None, str(e)   # no checkpoint of its own: the one that built the index may be found
    if info is not None and (info.fingerprint == built_by or not params["serving"]["require_model_match"]):
        return info, dim
    found = model_by_fingerprint(params, built_by)
    if found is None:
        opts = f"--profile {profile} --workdir {paths.workdir}"
        fix = (f"`pailitao item_embeddings {opts}` then `pailitao ann_index {opts}`" if lineage else
               f"`pailitao ab build --force {opts}`")
        raise NothingToServe(f"nothing to serve: the index in {index_dir} (version {meta['version']}) was built by "
                             f"model {built_by or '?'}, which no checkpoint here or in the registry is "
                             f"({why or f'{info.source} is {info.fingerprint}'}); rebuild it for the served "
                             f"model: {fix}")
    log.warning("%s did not build the index in %s; serving %s, which did", info.source if info else model,
                index_dir, found.source)
    return found, dim


def load_embedder(info: ModelInfo):
    from training.backbone import MLLMEmbedder

    return MLLMEmbedder.from_pretrained(info.path)


def variant_dirs(params: dict, model: str, variant: str | None = None,
                 champion: str | None = None) -> tuple[Path, Path]:
    """(item_embeddings dir, ann_index dir) serving `model`: the lineage's for serving.model (or the
    champion it resolves to: pass `champion`, its name, when it is known already), else
    data/processed/ab/<variant>/ (built by `pailitao ab build`)."""
    paths, served = Paths.from_params(params), params["serving"]["model"]
    if variant is None or model == served or (
            served == CHAMPION and model == (champion or resolve_model(params).name)):
        return paths.asset("item_embeddings"), paths.asset("ann_index")
    return paths.processed / "ab" / variant / "item_embeddings", paths.processed / "ab" / variant / "ann_index"


# ------------------------------------------------------------------------------------------ reranker
GATED = "gated"


def gated_rerank(params: dict) -> str:
    """What serving.rerank `gated` serves: `list` when the last ab_report's rerank gate passed
    (a significant win over embedding order within the latency budget), else `none`."""
    meta = Paths.from_params(params).asset("ab_report") / "meta.json"
    decision = read_json(meta).get("rerank_decision") if meta.is_file() else None
    if decision is None:
        log.warning("serving.rerank is gated but %s holds no rerank decision yet: serving embedding order", meta)
        return "none"
    log.info("serving.rerank gated: %s (%s)", decision["status"], "; ".join(decision["reasons"]))
    return "list" if decision["promoted"] else "none"


def build_reranker(params: dict, kind: str | None = None):
    """The search pipeline's reranker for serving.rerank (none | point | list | gated); None for none."""
    from retrieval.rerank import RERANK_ASSETS, load_reranker

    kind = kind or params["serving"].get("rerank", "none")
    if kind == GATED:
        kind = gated_rerank(params)
    if kind in (None, "none"):
        return None
    if kind not in RERANK_ASSETS:
        raise ValueError(f"serving.rerank must be none, point, list or gated, got {kind!r}")
    model_dir = Paths.from_params(params).asset(RERANK_ASSETS[kind]) / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"serving.rerank is {kind!r} but {model_dir} does not exist: run "
                                f"`pailitao {RERANK_ASSETS[kind]}` (or set serving.rerank: none)")
    return load_reranker(model_dir, params["reranker"], mode=kind)
