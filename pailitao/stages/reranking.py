"""Reranking lineage nodes: reranker_dataset -> reranker_model (chunkwise listwise) and
reranker_pointwise, plus the offline evaluation of a reranker over retrieved candidates that both
the stages (validation) and benchmarks/bench_reranker.py use."""
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

from data.queries import image_queries
from data.schema import Catalog
from retrieval.calibration import Calibrator, expected_calibration_error, fit_calibrator
from evaluation.compare import bootstrap_ratio_ci, percent_ci
from evaluation.metrics import best_f1_threshold, precision_recall_f1, retrieval_report
from evaluation.retrieval import encode_queries
from core.config import Paths, fingerprint
from core.io import atomic_path, read_json, write_json
from pailitao.stages import StageResult, ddp_worker, finish
from core.tracking import start_run, tracking_uri
from retrieval.models import load_embedder, resolve_model
from retrieval.fusion import FUSION_FILE, Fusion, features, fused_order
from retrieval.rerank import INFERENCE_FILE, INFERENCE_KEYS, RERANK_ASSETS, ChunkwiseReranker, PointwiseReranker, Ranked
from training import rerank_data as rd
from training.data import TrainItems
from training.modules import fit, launch_rank, resumable_key, run_id_file
from training.rerank_module import RerankerModule
from training.reranker import CALIBRATION_FILE, LIST, POINT, MLLMReranker
from training.vlm import use_feature_cache

log = logging.getLogger(__name__)
THRESHOLD_FILE = "threshold.json"


# ------------------------------------------------------------------------------------------ data
def served_gallery(params: dict) -> tuple[Path, pd.DataFrame, np.ndarray, dict]:
    """item_embeddings of the served embedder: (dir, items with absolute image paths, embeddings, meta)."""
    emb_dir = Paths.from_params(params).asset("item_embeddings")
    meta = read_json(emb_dir / "meta.json")
    items = pd.read_parquet(emb_dir / "items.parquet")
    items["image"] = [str(emb_dir.parent / p) for p in items["image"]]
    return emb_dir, items, np.load(emb_dir / "embeddings.npy"), meta


def reranker_dataset(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Noisy queries of train items with their top-N candidates from the served embedder (within
    the train split), graded levels, level-balanced training chunks; and validation queries
    (query_sets, val split) with their top-N from the whole catalog, for calibration."""
    paths, t0 = Paths.from_params(params), time.perf_counter()
    use_feature_cache(paths.feature_cache)
    cfg, n = params["reranker"], params["serving"]["candidates"]
    catalog = Catalog.load(paths.asset("validated_catalog"))
    splits = pd.read_parquet(paths.asset("splits") / "splits.parquet")
    info = resolve_model(params)
    _, gallery, g_emb, meta = served_gallery(params)
    if meta["model_version"] != info.fingerprint:
        raise ValueError(f"item_embeddings were built by model {meta['model_version']}, the served embedder is "
                         f"{info.fingerprint} ({info.source}); rebuild item_embeddings first")
    embedder, dim = load_embedder(info), params["model"]["served_dim"]
    train = TrainItems.from_catalog(catalog, splits).table
    out = paths.asset("reranker_dataset")
    qs_root = paths.asset("query_sets")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        queries = rd.train_queries(train, params["reranker"], params["queries"], params["noise"], params["seed"], tmp,
                                   params["ingest"]["workers"])
        in_train = gallery["item_id"].isin(set(train["item_id"])).to_numpy()
        # retrieved deeper than served: an instance just past the top-N is a near miss the chunks may
        # hold (it looks like what retrieval returns); a farther one never enters training
        deep = rd.label(rd.retrieve(encode_queries(embedder, queries, tmp, dim), gallery[in_train].reset_index(drop=True),
                                    g_emb[in_train], queries["query_id"], max(n, int(cfg["near_miss_depth"]))),
                        queries, catalog.items)
        cands = deep[deep["rank"] < n].reset_index(drop=True)
        near = deep[(deep["rank"] >= n) & (deep["level"] == 0)]
        chunks = rd.training_chunks(cands, cfg["chunk_size"], cfg["instance_share"], params["seed"], near)
        val = image_queries(pd.read_parquet(qs_root / "queries.parquet"))   # the reranker compares photos
        val = val[val["split"] == "val"].groupby("level", group_keys=False).head(cfg["val_queries"]).reset_index(drop=True)
        val_cands = rd.label(rd.retrieve(encode_queries(embedder, val, qs_root, dim), gallery, g_emb,
                                         val["query_id"], n), val, catalog.items)
        queries.to_parquet(tmp / "queries.parquet", index=False)
        cands.to_parquet(tmp / "candidates.parquet", index=False)
        chunks.to_parquet(tmp / "chunks.parquet", index=False)
        val.to_parquet(tmp / "val_queries.parquet", index=False)
        val_cands.to_parquet(tmp / "val_candidates.parquet", index=False)
        write_json({"fingerprint": catalog.meta["fingerprint"], "embedder": info.fingerprint,
                    "embedder_source": info.source, "candidates": n}, tmp / "meta.json")
    hit = lambda c, q: float(c[c["level"] == 0]["query_id"].nunique() / max(len(q), 1))  # noqa: E731
    metrics = {"train_queries": len(queries), "val_queries": len(val), "chunks": int(chunks.groupby(["query_id", "chunk"]).ngroups),
               "train_instance_in_topN": hit(cands, queries), "val_instance_in_topN": hit(val_cands, val),
               "chunks_with_instance": float(chunks.groupby("query_id")["level"].min().eq(0).mean()) if len(chunks) else 0.0,
               "chunk_positives_near_miss": int(((chunks["level"] == 0) & (chunks["rank"] >= n)).sum()),
               "chunk_positive_slot0_share": slot0_share(chunks),
               **rd.level_stats(cands, "candidates"), **rd.level_stats(chunks, "chunks"),
               "seconds": round(time.perf_counter() - t0, 1)}
    res = StageResult("reranker_dataset", out, metrics=metrics,
                      info={"embedder": info.source, "fingerprint": catalog.meta["fingerprint"]},
                      markdown={"levels": pd.DataFrame({
                          "level": ["instance", "concept", "functional", "irrelevant"],
                          "candidates": [metrics[f"candidates_level{i}"] for i in range(4)],
                          "balanced chunks": [metrics[f"chunks_level{i}"] for i in range(4)]}).to_markdown(index=False)})
    with start_run("reranker_dataset", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        return finish(res, run)


def slot0_share(chunks: pd.DataFrame) -> float:
    """Share of training positives in slot 0 of their chunk (1 / chunk size when slots are shuffled)."""
    pos = chunks[chunks["level"] == 0]
    return float((pos["slot"] == 0).mean()) if len(pos) else 0.0


# ------------------------------------------------------------------------------------------ evaluation
def docs_for(cands: pd.DataFrame, gallery: pd.DataFrame) -> dict[str, list[tuple]]:
    """query_id -> candidate docs (image path, title, None) in retrieval order."""
    image_of = dict(zip(gallery["image_id"], gallery["image"]))
    title_of = dict(zip(gallery["item_id"], gallery["title"]))
    c = cands.sort_values(["query_id", "rank"])
    return {q: [(image_of[i], title_of.get(it), None) for i, it in zip(g["image_id"], g["item_id"])]
            for q, g in c.groupby("query_id", sort=False)}


def query_doc(row, root: Path) -> tuple:
    return (Path(root) / row["image"] if isinstance(row["image"], str) else None,
            row["text"] if isinstance(row["text"], str) else None, None)


def run_reranker(ranker, queries: pd.DataFrame, root: Path, cands: pd.DataFrame, gallery: pd.DataFrame,
                 block: int = 16) -> dict:
    """Rerank every query's candidates (ranker None = the embedder's order). Returns levels and
    item ids [Q, N] in final order, the instance and concept pair scores [Q, N] by retrieval position, level [Q, N]
    by retrieval position, forward passes and wall seconds."""
    docs = docs_for(cands, gallery)
    by_q = {q: g.sort_values("rank") for q, g in cands.groupby("query_id")}
    n = max((len(g) for g in by_q.values()), default=0)
    Q = len(queries)
    final, lv_pos = np.full((Q, n), 9, dtype=np.int64), np.full((Q, n), 9, dtype=np.int64)
    p_inst, p_conc, p_raw = np.full((Q, n), -np.inf), np.full((Q, n), -np.inf), np.full((Q, n), -np.inf)
    first, unfused, s_rel = np.full((Q, n), np.nan), np.full((Q, n), np.nan), np.full((Q, n), np.nan)
    items, items_pos = np.full((Q, n), None, dtype=object), np.full((Q, n), None, dtype=object)
    passes, t0, ms = 0, time.perf_counter(), []
    qids = queries["query_id"].tolist()
    row_of = {q: i for i, q in enumerate(qids)}
    for s in range(0, Q, block):
        part = [q for q in qids[s:s + block] if q in by_q]
        if ranker is None:
            ranked = [Ranked(np.arange(len(by_q[q])), by_q[q]["score"].to_numpy(), by_q[q]["score"].to_numpy(),
                             by_q[q]["score"].to_numpy(), 0) for q in part]
        else:
            rows = queries.set_index("query_id").loc[part]
            args = ([query_doc(r, root) for _, r in rows.iterrows()], [docs[q] for q in part],
                    [by_q[q]["score"].to_numpy() for q in part])
            t_block = time.perf_counter()
            ranked = ranker.rank_many(*args)
            ms.append((time.perf_counter() - t_block) * 1e3 / max(len(part), 1))   # per query (block=1: as served)
        for q, r in zip(part, ranked):
            i, levels = row_of[q], by_q[q]["level"].to_numpy()
            m = len(levels)
            final[i, :m], lv_pos[i, :m] = levels[r.order], levels
            items_pos[i, :m] = by_q[q]["item_id"].to_numpy()
            items[i, :m] = items_pos[i, :m][r.order]
            p_inst[i, :m], p_conc[i, :m] = r.p_instance, r.concept
            p_raw[i, :m] = r.extra.get("r_raw", r.p_instance)
            first[i, :m] = by_q[q]["score"].to_numpy()
            unfused[i, :m] = r.extra.get("unfused", r.extra.get("r_raw", r.p_instance))
            s_rel[i, :m] = r.extra.get("s_minus_null", np.nan)
            passes += r.forward_passes
    return {"levels": final, "items": items, "items_by_rank": items_pos, "levels_by_rank": lv_pos, "p_instance": p_inst, "p_concept": p_conc, "p_raw": p_raw,
            "first_stage": first, "unfused": unfused, "s_minus_null": s_rel,
            "forward_passes": passes, "seconds": time.perf_counter() - t0, "queries": Q, "ms": np.array(ms)}


def run_features(run: dict) -> list[dict[str, np.ndarray]]:
    """Per query row of a run_reranker result: the fusion inputs of its candidates (by position)."""
    out = []
    for i in range(len(run["levels_by_rank"])):
        m = int((run["levels_by_rank"][i] < 9).sum())
        extra = {"r_raw": run["unfused"][i, :m]}
        if not np.isnan(run["s_minus_null"][i, :m]).all():
            extra["s_minus_null"] = run["s_minus_null"][i, :m]
        out.append(features(run["first_stage"][i, :m], extra))
    return out


def fit_fusion(run: dict) -> Fusion:
    """The fusion of retrieval and reranker scores, fit on a (validation) run's pairs."""
    feats = [f for f in run_features(run) if len(f["first_stage"])]
    if not feats:
        raise ValueError("fusion needs validation pairs, the validation run has none")
    pooled = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]}
    return Fusion.fit(pooled, run["levels_by_rank"][run["levels_by_rank"] < 9] == 0)


def apply_fusion(run: dict, fusion: Fusion) -> dict:
    """The run re-ordered by the fused probability (no model pass: the scores are in the run)."""
    run = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in run.items()}
    for i, f in enumerate(run_features(run)):
        m = len(f["first_stage"])
        prob = fusion.prob(f)
        order = fused_order(prob)
        run["levels"][i, :m] = run["levels_by_rank"][i, :m][order]
        run["items"][i, :m] = run["items_by_rank"][i, :m][order]
        run["p_raw"][i, :m] = run["p_instance"][i, :m] = prob
    return run


def prf(run: dict, thresholds: dict | None = None) -> tuple[dict, dict]:
    """Instance ({0}) and concept ({0,1}) precision/recall/F1 over all (query, candidate) pairs, at
    the given thresholds or, without them, at the best-F1 thresholds of these (validation) pairs."""
    filled = run["levels_by_rank"] < 9
    lv = run["levels_by_rank"][filled]
    out, chosen = {}, {}
    for name, key, pos in (("instance", "p_instance", lv == 0), ("concept", "p_concept", lv <= 1)):
        score = run[key][filled]
        t = (thresholds or {}).get(name)
        if t is None:
            t = best_f1_threshold(score, pos)[0]
        p, r, f = precision_recall_f1(score, pos, t)
        chosen[name] = float(t)
        out.update({f"{name}_P": 100 * p, f"{name}_R": 100 * r, f"{name}_F1": 100 * f})
    return out, chosen


def prf_by_group(run: dict, thresholds: dict, groups, n_boot: int = 2000, alpha: float = 0.05) -> dict:
    """prf at fixed (validation) thresholds, per group of queries (noise level) and "all", with
    bootstrap intervals over queries (a query's candidate pairs are not independent):
    {instance_P, instance_R, instance_F1, concept_*} -> group -> {value, ci_low, ci_high}, percent."""
    lv, groups = run["levels_by_rank"], np.asarray(groups)
    filled, out = lv < 9, {}
    for name, key, pos in (("instance", "p_instance", lv == 0), ("concept", "p_concept", lv <= 1)):
        pos = pos & filled
        pred = (run[key] >= thresholds[name]) & filled
        tp, n_pred, n_pos = (pred & pos).sum(1), pred.sum(1), pos.sum(1)
        for g in ["all", *sorted(set(groups.tolist()))]:
            m = np.ones(len(groups), bool) if g == "all" else groups == g
            for stat, num, den in (("P", tp, n_pred), ("R", tp, n_pos), ("F1", 2 * tp, n_pred + n_pos)):
                out.setdefault(f"{name}_{stat}", {})[g] = percent_ci(*bootstrap_ratio_ci(num[m], den[m], n_boot, alpha))
    return out


def report(run: dict, queries: pd.DataFrame) -> pd.DataFrame:
    return retrieval_report(run["levels"], queries["n_instance"].to_numpy(), queries["n_concept"].to_numpy(),
                            ks=(1, 5, 10), groups=queries["level"].reset_index(drop=True))


# ------------------------------------------------------------------------------------------ training
def train_reranker(params: dict, mode: str, out: Path, dagster_run_id: str | None = None,
                   stage: str | None = None, register: bool = True) -> StageResult:
    """Train a pointwise or listwise reranker on reranker_dataset, calibrate P(instance) on the
    validation candidates, choose the P/R/F1 thresholds there, save to out/model (atomic),
    register it in MLflow."""
    from retrieval.registry import log_reranker

    paths, cfg, t0 = Paths.from_params(params), params["reranker"], time.perf_counter()
    use_feature_cache(paths.feature_cache)   # catalog candidates repeat across steps and stages
    stage = stage or RERANK_ASSETS[mode]
    ds = paths.asset("reranker_dataset")
    ds_meta = read_json(ds / "meta.json")
    _, gallery, _, _ = served_gallery(params)
    info = resolve_model(params)
    chunks, queries = pd.read_parquet(ds / "chunks.parquet"), pd.read_parquet(ds / "queries.parquet")
    L.seed_everything(params["seed"], workers=True)
    model = MLLMReranker.from_embedder(info.path, mode=mode, absolute=cfg["absolute"], scorer_hidden=cfg["scorer_hidden"],
                                       query_crop=cfg["query_crop"], scorer_input=cfg["scorer_input"])
    data = rd.RerankSet(chunks, queries, ds, dict(zip(gallery["image_id"], gallery["image"])),
                        dict(zip(gallery["item_id"], gallery["title"])), mode)
    bs = cfg["batch_size"] if mode == LIST else cfg["point_batch_size"]
    loader = torch.utils.data.DataLoader(data, batch_size=bs, collate_fn=rd.collate,
                                         sampler=rd.train_sampler(data, cfg.get("point_positive_share"), params["seed"]))
    module = RerankerModule(model, cfg, cfg["steps"])
    work = paths.processed / ".work" / f"{stage}-{fingerprint([ds_meta, cfg, resumable_key(params['train']), params['seed'], str(out)])}"
    rank = launch_rank(params["train"])
    if rank != 0:   # a DDP worker: trains; rank 0 validates, records and writes
        fit(module, loader, params["train"], work, cfg["steps"], None)
        return ddp_worker(stage, out, rank)
    with start_run(stage, params, ds_meta["fingerprint"], dagster_run_id, run_id_file=run_id_file(work)) as run:
        logger = MLFlowLogger(tracking_uri=tracking_uri(params), run_id=run.info.run_id)
        trainer = fit(module, loader, params["train"], work, cfg["steps"], logger)
        train_s = time.perf_counter() - t0
        model.eval()
        # validation: rerank the val candidates, fit the calibrator, choose P/R/F1 thresholds
        val_q, val_c = pd.read_parquet(ds / "val_queries.parquet"), pd.read_parquet(ds / "val_candidates.parquet")
        ranker = (PointwiseReranker(model, batch_size=cfg["batch_size_infer"]) if mode == POINT else
                  ChunkwiseReranker(model, None, cfg["chunk_size"], cfg["assign"],
                                    cfg["merge"] if model.absolute else "s_minus_null", cfg["batch_size_infer"]))
        qs_root = paths.asset("query_sets")
        val_run, cal, fusion = validate(ranker, val_q, qs_root, val_c, gallery, cfg["calibration"], cfg["fusion"])
        filled = val_run["levels_by_rank"] < 9
        raw, positive = val_run["p_raw"][filled], val_run["levels_by_rank"][filled] == 0
        cal_report = cross_fitted_ece(raw, positive, cfg["calibration"])
        pr, thresholds = prf(val_run)
        rep = report(val_run, val_q).reset_index()
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp / "model")
            cal.save(tmp / "model" / CALIBRATION_FILE)
            if fusion is not None:
                fusion.save(tmp / "model" / FUSION_FILE)
            write_json(thresholds, tmp / "model" / THRESHOLD_FILE)
            merge_how = {"merge": ranker.merge_how} if mode == LIST else {}   # as validated
            write_json({k: cfg[k] for k in INFERENCE_KEYS} | merge_how, tmp / "model" / INFERENCE_FILE)
            rep.to_parquet(tmp / "val_report.parquet", index=False)
            write_json({"mode": mode, "dataset": ds_meta, "steps": cfg["steps"], "calibration": cal_report,
                        "thresholds": thresholds}, tmp / "meta.json")
        version = log_reranker(out / "model", stage, params, ds_meta["fingerprint"]) if register else "not registered"
        shutil.rmtree(work, ignore_errors=True)
        _log_reliability(raw, cal(raw), positive)
        all_row = rep.set_index("group").loc["all"]
        loss = trainer.callback_metrics.get("train/loss")
        per_step = cfg["batch_size"] if mode == LIST else cfg["point_batch_size"]
        res = StageResult(stage, out, metrics={
            "steps": trainer.global_step, "train_seconds": round(train_s, 1),
            "samples_per_second": round(cfg["steps"] * per_step / max(train_s, 1e-9), 2),
            "final_loss": float(loss) if loss is not None else float("nan"),
            "val_I_HR_at_1": float(all_row["I-HR@1"]), "val_I_HR_at_10": float(all_row["I-HR@10"]),
            **{f"val_{k}": v for k, v in pr.items()},
            "val_ece_before": cal_report["ece_before"], "val_ece_after": cal_report["ece_after"],
            "val_queries_per_second": round(val_run["queries"] / max(val_run["seconds"], 1e-9), 2)},
            info={"mode": mode, "registered_version": version, "calibration": cal.kind,
                  "fusion": dict(zip(fusion.names, fusion.coef)) if fusion else None,
                  "fingerprint": ds_meta["fingerprint"]},
            markdown={"validation": rep.to_markdown(index=False, floatfmt=".2f")})
        return finish(res, run)


def validate(ranker, val_q: pd.DataFrame, root: Path, val_c: pd.DataFrame, gallery: pd.DataFrame,
             calibration: str, fuse: bool) -> tuple[dict, object, Fusion | None]:
    """Rerank the validation candidates, fit the fusion with the retrieval score (when `fuse`) and
    the calibrator of the ranker's raw P(instance); the ranker keeps both. Returns the validation
    run with calibrated p_instance, the calibrator and the fusion."""
    ranker.fusion, ranker.calibrator = None, Calibrator("identity")
    val_run, fusion = run_reranker(ranker, val_q, root, val_c, gallery), None
    if fuse:
        try:
            fusion = fit_fusion(val_run)
        except ValueError as e:   # a validation set without a hit (tiny catalogs): the model's own order
            log.warning("no fusion of retrieval and reranker scores: %s", e)
    if fusion is not None:
        val_run, ranker.fusion = apply_fusion(val_run, fusion), fusion
    filled = val_run["levels_by_rank"] < 9
    cal = fit_calibrator(val_run["p_raw"][filled].clip(0, 1), val_run["levels_by_rank"][filled] == 0, calibration)
    ranker.calibrator = cal
    val_run["p_instance"] = np.where(filled, cal(np.nan_to_num(val_run["p_raw"], neginf=0.0).clip(0, 1)), -np.inf)
    return val_run, cal, fusion


def cross_fitted_ece(prob: np.ndarray, positive: np.ndarray, kind: str, seed: int = 0) -> dict:
    """ECE before and after calibration where "after" is honest: two folds, each calibrated by a
    calibrator fitted on the other (fitting and measuring on the same pairs would read ~0)."""
    fold = np.random.default_rng(seed).random(len(prob)) < 0.5
    after = np.empty(len(prob))
    for f in (fold, ~fold):
        after[f] = fit_calibrator(prob[~f], positive[~f], kind)(prob[f]) if f.any() else prob[f]
    return {"ece_before": expected_calibration_error(prob, positive),
            "ece_after": expected_calibration_error(after, positive), "n": int(len(prob)),
            "positives": int(positive.sum())}


def _log_reliability(before: np.ndarray, after: np.ndarray, positive: np.ndarray) -> None:
    """Calibration diagram (validation) as an MLflow artifact, drawn like the A/B report's."""
    from evaluation.report import plot_calibration

    mlflow.log_figure(plot_calibration({"raw": (before, positive), "calibrated": (after, positive)}),
                      "calibration.png")


def reranker_model(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """The chunkwise listwise reranker (NULL token, absolute scorer, hybrid merge)."""
    return train_reranker(params, LIST, Paths.from_params(params).asset("reranker_model"), dagster_run_id)


def reranker_pointwise(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """The pointwise reranker (P(yes) per candidate), the comparison arm."""
    return train_reranker(params, POINT, Paths.from_params(params).asset("reranker_pointwise"), dagster_run_id)
