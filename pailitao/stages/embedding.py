"""Embedding lineage nodes: stage1_embedder -> semantic_prototypes -> embedding_model, and the
control baseline_embedder. Each is one MLflow run; checkpoints are registered in the registry."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import MLFlowLogger
from PIL import Image

from data.schema import Catalog
from evaluation.retrieval import cached_gallery, evaluate
from core.config import Paths, fingerprint
from core.io import atomic_path, write_json, write_parquet
from retrieval.registry import log_embedder
from pailitao.stages import StageResult, ddp_worker, finish
from core.tracking import start_run, tracking_uri
from retrieval.models import model_fingerprint
from training.backbone import MLLMEmbedder
from training.finetune import merge_adapters, prepare_for_training
from training.data import PairDataset, TrainItems
from training.modules import CONTRASTIVE, ID, EmbeddingModule, HardNegativeMiner, fit, launch_rank, make_loader, resumable_key, run_id_file
from training.prototypes import curate, prototype_labels
from training.head import ShardedPrototypeHead
from training.vlm import use_feature_cache

log = logging.getLogger(__name__)
VAL_LEVELS = ("clean", "hard")   # validation retrieval during the lineage: both ends of the noise range
VAL_QUERIES = 200                # per level, so validation stays a small share of training time


def _inputs(params: dict) -> tuple[Paths, Catalog, pd.DataFrame]:
    paths = Paths.from_params(params)
    use_feature_cache(paths.feature_cache)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    return paths, catalog, pd.read_parquet(paths.asset("splits") / "splits.parquet")


def _work_dir(paths: Paths, stage: str, params: dict, catalog: Catalog) -> Path:
    """Checkpoints of an unfinished run live here, keyed by what decides the result, so a killed
    run resumes only into an identical configuration (on any world size: the head re-shards)."""
    key = fingerprint([catalog.meta["fingerprint"], params["model"], resumable_key(params["train"]),
                       params["margin"], params["prototypes"], params["seed"], stage])
    return paths.processed / ".work" / f"{stage}-{key}"


def validation_report(embedder: MLLMEmbedder, catalog: Catalog, params: dict, split: str = "val",
                      levels=VAL_LEVELS, per_level: int | None = VAL_QUERIES,
                      model_dir: Path | None = None) -> pd.DataFrame:
    """Retrieval on the validation queries; with `model_dir` (the saved checkpoint) the catalog pass
    goes through the gallery cache, so the promotion gate and item_embeddings reuse it."""
    paths = Paths.from_params(params)
    root = paths.asset("query_sets")
    q = pd.read_parquet(root / "queries.parquet")
    q = q[(q["split"] == split) & q["level"].isin(levels)]
    if per_level:
        q = q.groupby("level", group_keys=False).head(per_level)
    dim = params["model"]["served_dim"]
    cache = cached_gallery(paths.gallery_cache, model_fingerprint(model_dir), lambda: embedder, catalog, dim) \
        if model_dir is not None and len(q) else None
    return evaluate(embedder, catalog, q.reset_index(drop=True), root, dim, gallery_cache=cache).reset_index()


def _report_metrics(report: pd.DataFrame, prefix: str = "val") -> dict:
    out = {}
    for group, row in report.set_index("group").iterrows():
        for col in ("I-HR@1", "I-HR@10", "R@1", "R@10", "mAP@R"):
            if col in row and pd.notna(row[col]):
                out[f"{prefix}_{group}_{col}".replace("@", "_at_").replace("-", "_")] = float(row[col])
    return out


def finetune_config(model_params: dict) -> dict:
    """model.finetune for pretrained weights; a random-init size preset trains in full (adapters on
    random weights would learn next to nothing)."""
    if model_params["preset"] in ("packaged", "pretrained"):
        return model_params.get("finetune") or {}
    return {"method": "full"}


def _train(stage: str, params: dict, mode: str, steps: int, dagster_run_id: str | None,
           init: Path, lr: float) -> StageResult:
    paths, catalog, splits = _inputs(params)
    out = paths.asset(stage)
    items = TrainItems.from_catalog(catalog, splits)
    t0 = time.perf_counter()
    head, neighbours, extra = None, None, {}
    if mode == ID:
        proto_dir = paths.asset("semantic_prototypes")
        protos = pd.read_parquet(proto_dir / "prototypes.parquet")
        labels = prototype_labels(pd.read_parquet(proto_dir / "assignment.parquet"), protos)
        m = params["margin"]
        head = ShardedPrototypeHead(np.load(proto_dir / "centroids.npy", mmap_mode="r"),
                                    params["model"]["mrl_dims"], params["model"]["mrl_weights"],
                                    m["margin"], m["temperature"], knn_k=min(int(m["knn_k"]), len(protos) - 1),
                                    refresh_steps=m["knn_refresh_steps"], sampler=m["sampler"],
                                    seed=params["seed"], row_dtype=getattr(torch, m["row_dtype"]),
                                    row_update=m["row_update"], row_renorm=m["row_renorm"],
                                    ema_decay=m["ema_decay"])
        neighbours = head.neighbours(params["train"]["batch_size"])
        extra["prototypes"] = len(protos)
    else:
        groups = sorted(items.table["group_id"].unique())
        index = {g: i for i, g in enumerate(groups)}
        labels = dict(zip(items.table["item_id"], items.table["group_id"].map(index)))
    L.seed_everything(params["seed"], workers=True)   # model init and sampling are reproducible
    embedder = MLLMEmbedder.from_pretrained(init)
    extra.update(prepare_for_training(embedder.model, finetune_config(params["model"])))
    dataset = PairDataset(items, labels, params["train"], params["noise"], params["seed"])
    module = EmbeddingModule(embedder, params["model"], params["train"], params["margin"], mode, steps, head=head,
                             dataset=dataset, lr=lr)
    work = _work_dir(paths, stage, params, catalog)
    callbacks = [HardNegativeMiner(params["train"]["hard_refresh_steps"], params["train"]["hard_negatives"])] \
        if mode == CONTRASTIVE else []
    loader = make_loader(dataset, params["train"], params["margin"], params["seed"], neighbours)
    rank = launch_rank(params["train"])
    if rank != 0:   # a DDP worker (torchrun, SLURM, another node): trains its share; rank 0 records and writes
        fit(module, loader, params["train"], work, steps, None, callbacks)
        return ddp_worker(stage, out, rank)
    # a training resumed from the work dir's checkpoint continues the MLflow run the kill interrupted
    with start_run(stage, params, catalog.meta["fingerprint"], dagster_run_id, run_id_file=run_id_file(work)) as run:
        logger = MLFlowLogger(tracking_uri=tracking_uri(params), run_id=run.info.run_id)
        trainer = fit(module, loader, params["train"], work, steps, logger, callbacks)
        train_s = time.perf_counter() - t0
        samples = steps * params["train"]["batch_size"]
        merge_adapters(embedder.model)   # a plain checkpoint: the next stage and the service need no peft
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            embedder.save_pretrained(tmp / "model")
            report = validation_report(embedder, catalog, params, model_dir=tmp / "model")
            write_parquet(report, tmp / "val_report.parquet")
            write_json({"fingerprint": catalog.meta["fingerprint"], "mode": mode, "steps": steps,
                        "init": str(init) if init else None}, tmp / "meta.json")
        version = log_embedder(out / "model", stage, params, catalog.meta["fingerprint"])
        shutil.rmtree(work, ignore_errors=True)   # finished: nothing to resume
        loss = trainer.callback_metrics.get("train/loss")
        res = StageResult(stage, out,
                          metrics={"steps": trainer.global_step, "samples": samples,
                                   "train_seconds": round(train_s, 1),
                                   "samples_per_second": round(samples / max(train_s, 1e-9), 2),
                                   "final_loss": float(loss) if loss is not None else float("nan"),
                                   **_report_metrics(report), **extra},
                          info={"mode": mode, "registered_version": version,
                                "fingerprint": catalog.meta["fingerprint"]},
                          markdown={"validation": report.to_markdown(index=False, floatfmt=".2f")
                                    if len(report) else "_no validation queries_",
                                    "loss_curve": loss_curve_markdown(run.info.run_id, params)})
        mlflow.log_table(report, "val_report.json")
        return finish(res, run)


def loss_curve_markdown(run_id: str, params: dict) -> str:
    """The train/loss history of the run as a PNG, inline (Dagster UI) and as an MLflow artifact."""
    import base64
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = mlflow.MlflowClient(tracking_uri(params)).get_metric_history(run_id, "train/loss")
    if not hist:
        return "_no loss logged_"
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    ax.plot([h.step for h in hist], [h.value for h in hist], lw=1)
    ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.grid(alpha=0.3)
    fig.tight_layout()
    mlflow.log_figure(fig, "loss_curve.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"![loss](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def base_model(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """The model every other model starts from: pretrained weights from pip packages, converted once."""
    paths, catalog, splits = _inputs(params)
    t0 = time.perf_counter()
    items = TrainItems.from_catalog(catalog, splits)
    L.seed_everything(params["seed"], workers=True)
    mp, info, extra = params["model"], {"preset": params["model"]["preset"]}, {}
    if mp["preset"] == "packaged":
        from training.pretrained import build_base_model, parameter_counts, provenance

        calib = items.table.sample(min(len(items), 64), random_state=params["seed"])
        embedder = build_base_model(mp["base"], int(mp.get("max_text_tokens", 24)), mp.get("mrl_dims"),
                                    ([Image.open(p).convert("RGB") for p in calib["image"]], calib["title"].tolist()),
                                    documents=items.table["title"].tolist())
        info["sources"] = provenance(mp["base"])
        extra = parameter_counts(embedder.model)
    else:   # a size preset: random init, tokenizer trained on the train titles (the tiny test profile)
        embedder = MLLMEmbedder.from_params(mp, items.table["title"].tolist())
        extra = {"total": sum(p.numel() for p in embedder.model.parameters())}
    build_s = time.perf_counter() - t0
    out = paths.asset("base_model")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        embedder.save_pretrained(tmp / "model")
        # the zero-shot floor, on the validation queries
        report = validation_report(embedder, catalog, params, model_dir=tmp / "model")
        write_parquet(report, tmp / "val_report.parquet")
        write_json({"fingerprint": catalog.meta["fingerprint"], **info, "parameters": extra}, tmp / "meta.json")
    sources = pd.DataFrame(info.get("sources", []))
    res = StageResult("base_model", out,
                      metrics={"build_seconds": round(build_s, 1), **{f"parameters_{k}": v for k, v in extra.items()},
                               **_report_metrics(report, "zero_shot")},
                      info={k: v for k, v in info.items() if k != "sources"} | {"fingerprint": catalog.meta["fingerprint"]},
                      markdown={"sources": sources.to_markdown(index=False) if len(sources) else "_random init_",
                                "zero_shot": report.to_markdown(index=False, floatfmt=".2f")
                                if len(report) else "_no validation queries_"})
    with start_run("base_model", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        if len(sources):
            mlflow.log_table(sources, "sources.json")
        mlflow.log_table(report, "val_report.json")
        return finish(res, run)


def stage1_embedder(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Stage 1: MLLM2vec trained with InfoNCE (in-batch + mined hard negatives) and Matryoshka."""
    init = Paths.from_params(params).asset("base_model") / "model"
    return _train("stage1_embedder", params, CONTRASTIVE, params["train"]["stage1_steps"], dagster_run_id, init,
                  params["train"]["lr"])


def embedding_model(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Stage 3: backbone + prototype head, additive angular margin over KNN-sparse negatives."""
    init = Paths.from_params(params).asset("stage1_embedder") / "model"
    return _train("embedding_model", params, ID, params["train"]["stage3_steps"], dagster_run_id, init,
                  params["train"]["stage3_lr"])


def baseline_embedder(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """The control: stage 1 continued contrastively for the same steps as stage 3 (same budget)."""
    init = Paths.from_params(params).asset("stage1_embedder") / "model"
    return _train("baseline_embedder", params, CONTRASTIVE, params["train"]["stage3_steps"], dagster_run_id, init,
                  params["train"]["stage3_lr"])


def library_shape(prototypes: pd.DataFrame, items: pd.DataFrame) -> dict:
    """Members per prototype (median, p90, max), instances per prototype (mean), and group purity:
    the share of items whose prototype's most common instance is their own (1.0 when prototypes
    are the instances; what pooling many listings of one product must keep high)."""
    group = dict(zip(items["item_id"].astype(str), items["group_id"].astype(str)))
    groups = [[group.get(str(m), str(m)) for m in members] for members in prototypes["members"]]
    major = [pd.Series(g).value_counts().iloc[0] if len(g) else 0 for g in groups]
    n = prototypes["n_members"].to_numpy()
    return {"members_p50": float(np.median(n)), "members_p90": float(np.quantile(n, 0.9)), "members_max": int(n.max()),
            "instances_per_prototype": float(np.mean([len(set(g)) for g in groups])),
            "group_purity": float(sum(major) / max(int(n.sum()), 1))}


def semantic_prototypes(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Stage 2: prototype library curated from stage-1 embeddings of the train items."""
    paths, catalog, splits = _inputs(params)
    embedder = MLLMEmbedder.from_pretrained(paths.asset("stage1_embedder") / "model")
    items = TrainItems.from_catalog(catalog, splits)
    emb = embedder.encode([Image.open(p).convert("RGB") for p in items.table["image"]],
                          items.table["title"].tolist(), batch_size=64, progress=True)
    result = curate(items.table, emb, params["prototypes"])
    result.stats.update(library_shape(result.prototypes, items.table))
    out = paths.asset("semantic_prototypes")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        result.prototypes.to_parquet(tmp / "prototypes.parquet", index=False)
        np.save(tmp / "centroids.npy", result.centroids)
        result.assignment.to_parquet(tmp / "assignment.parquet", index=False)
        result.report.to_parquet(tmp / "report.parquet", index=False)
        write_json({"fingerprint": catalog.meta["fingerprint"], **result.stats}, tmp / "meta.json")
    numeric = {k: v for k, v in result.stats.items() if isinstance(v, (int, float, np.integer, np.floating))}
    res = StageResult("semantic_prototypes", out, metrics=numeric,
                      info={"fingerprint": catalog.meta["fingerprint"]},
                      markdown={"events": result.report["kind"].value_counts().rename_axis("event")
                                .reset_index().to_markdown(index=False) if len(result.report) else "_no merges or prunes_",
                                "examples": result.report.head(15).to_markdown(index=False) if len(result.report) else ""})
    with start_run("semantic_prototypes", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        mlflow.log_table(result.report, "curation_report.json")
        return finish(res, run)
