"""The decision end of the lineage:

embedding_promotion: offline A/B of the embedder, contrastive control vs ID-prototype treatment on
the same unseen test queries (whole catalog as gallery), paired bootstrap per metric, per-query
latency; the promotion gate moves the registry aliases (evaluation/promotion.py).

ab_report: that comparison plus the reranking A/B (none vs pointwise vs listwise-hybrid on the
served embedder's top-N), calibration, the online A/B analysis of the serving event log, and one
self-contained HTML report; every metric goes to MLflow and to metrics.json."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from data.queries import image_queries
from data.schema import Catalog
from evaluation import promotion
from retrieval.calibration import expected_calibration_error
from evaluation.compare import bootstrap_mean_ci, compare, percent_ci, proportion_ci, two_proportion_test
from evaluation.metrics import latency_summary, per_query_metrics
from evaluation.report import GalleryQuery, ReportData, render_report
from evaluation.retrieval import cached_gallery, encode_queries
from core.config import Paths
from core.io import atomic_path, read_json, write_json
from pailitao.stages import StageResult, finish
from core.tracking import git_commit, start_run, tracking_uri
from pailitao.stages import reranking as rs
from retrieval.models import build_reranker, load_embedder, model_fingerprint, resolve_model
from training import rerank_data as rd
from training.backbone import MLLMEmbedder
from training.vlm import use_feature_cache

log = logging.getLogger(__name__)
ARMS = {"control": promotion.CONTROL, "treatment": promotion.TREATMENT}
METRICS = ["I-HR@1", "I-HR@5", "I-HR@10", "C-HR@1", "C-HR@5", "C-HR@10", "R@1", "R@5", "R@10", "mAP@R", "NDCG@10"]
CURVE_KS = (1, 2, 3, 5, 10, 20, 50)
PRF = ("_P", "_R", "_F1")   # instance_/concept_ precision, recall, F1 keys in an arm's metrics


def _queries(params: dict, split: str, per_level: int) -> pd.DataFrame:
    """Up to per_level queries of each noise level of `split`. A small catalog whose own queries
    (a manifest's queries.csv) fall in other splits is evaluated on those, with a warning."""
    # the photo query sets only: the gate's numbers stay comparable across query_sets versions
    q = image_queries(pd.read_parquet(Paths.from_params(params).asset("query_sets") / "queries.parquet"))
    for s in (split, "test" if split == "val" else "val", None):
        sel = q if s is None else q[q["split"] == s]
        if len(sel):
            break
    if s != split:
        log.warning("no %s queries in query_sets: evaluating on %s", split, s or "all queries")
    if sel.empty:
        raise ValueError("query_sets holds no queries: nothing to evaluate")
    return sel.groupby("level", group_keys=False).head(per_level).reset_index(drop=True)


def embed_arms(params: dict, catalog: Catalog, queries: pd.DataFrame, root: Path, n: int,
               arms: dict[str, tuple]) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Per arm: (candidates with levels, per-query latency ms of embed + exact search). Queries are
    embedded one at a time as the service does, the arms interleaved query by query (alternating
    which goes first) so a busy machine slows both alike and the latency gate compares like with like.
    arms: name -> (embedder, gallery, gallery embeddings, faiss index) from _load_arm."""
    dim = params["model"]["served_dim"]
    embs, ms = {a: [] for a in arms}, {a: [] for a in arms}
    for i, (_, row) in enumerate(queries.iterrows()):
        doc = rs.query_doc(row, root)
        image = Image.open(doc[0]).convert("RGB") if doc[0] else None
        for a in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
            embedder, g, _, index = arms[a]
            t0 = time.perf_counter()
            e = embedder.encode([image], [doc[1]], batch_size=1, dim=dim)
            index.search(e, min(len(g), 3 * n))
            ms[a].append((time.perf_counter() - t0) * 1e3)
            embs[a].append(e[0])
    return {a: (rd.label(rd.retrieve(np.stack(embs[a]), g, g_emb, queries["query_id"], n), queries, catalog.items),
                np.array(ms[a])) for a, (_, g, g_emb, _) in arms.items()}


def _load_arm(params: dict, stage: str, catalog: Catalog) -> tuple:
    paths = Paths.from_params(params)
    path = paths.asset(stage) / "model"
    use_feature_cache(paths.feature_cache)   # test queries: one tower pass for both arms
    embedder = MLLMEmbedder.from_pretrained(path)
    g, g_emb = cached_gallery(paths.gallery_cache, model_fingerprint(path), lambda: embedder,
                              catalog, params["model"]["served_dim"])
    index = faiss.IndexFlatIP(g_emb.shape[1])
    index.add(g_emb)
    embedder.encode([Image.new("RGB", (64, 64), "white")], ["warm up"], dim=params["model"]["served_dim"])  # first pass allocates
    return embedder, g, g_emb, index


def _per_query(run: dict, queries: pd.DataFrame) -> pd.DataFrame:
    pq = per_query_metrics(run["levels"], queries["n_instance"].to_numpy(), queries["n_concept"].to_numpy())
    return pq.set_index(queries["query_id"].to_numpy()).assign(noise=queries["level"].to_numpy())


def _summaries(pq: pd.DataFrame, cfg: dict) -> dict:
    """metric -> noise level (+ all) -> {value, ci_low, ci_high} in percent."""
    out = {}
    for noise, part in [("all", pq)] + sorted(pq.groupby("noise")):
        for m in METRICS:
            out.setdefault(m, {})[noise] = percent_ci(*bootstrap_mean_ci(part[m].to_numpy(dtype=float),
                                                                         cfg["bootstrap"], cfg["alpha"]))
    return out


def _curve(levels: np.ndarray) -> dict[int, float]:
    hit = levels == 0
    return {k: float(100 * hit[:, :k].any(1).mean()) for k in CURVE_KS if k <= levels.shape[1]}


def _arm_record(run: dict, queries: pd.DataFrame, ms: np.ndarray, thresholds: dict | None, cfg: dict) -> dict:
    pq = _per_query(run, queries)
    _, thr = rs.prf(run, thresholds)
    prf = rs.prf_by_group(run, thr, queries["level"].to_numpy(), cfg["bootstrap"], cfg["alpha"])
    return {"per_query": pq, "metrics": _summaries(pq, cfg) | prf, "thresholds": thr,
            "latency": latency_summary(ms), "latency_ms": ms, "curve": _curve(run["levels"]), "run": run}


def _comparison(a: dict, b: dict, cfg: dict) -> pd.DataFrame:
    return compare(a["per_query"][METRICS], b["per_query"][METRICS], n_boot=cfg["bootstrap"], alpha=cfg["alpha"])


# ------------------------------------------------------------------------------------------ stage 1
def embedding_promotion(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """Offline A/B of the embedder (control vs treatment, paired bootstrap) and the promotion gate:
    the treatment becomes champion only on a significant gate-metric win within the latency budget."""
    paths, cfg, n = Paths.from_params(params), params["report"], params["serving"]["candidates"]
    catalog = Catalog.load(paths.asset("validated_catalog"))
    root = paths.asset("query_sets")
    test, val = _queries(params, "test", cfg["queries_per_level"]), _queries(params, "val", cfg["queries_per_level"])
    loaded = {arm: _load_arm(params, stage, catalog) for arm, stage in ARMS.items()}
    on_val, on_test = embed_arms(params, catalog, val, root, n, loaded), embed_arms(params, catalog, test, root, n, loaded)
    arms = {}
    for arm, (_, g, _, _) in loaded.items():
        _, thresholds = rs.prf(rs.run_reranker(None, val, root, on_val[arm][0], g))   # P/R/F1 thresholds on val
        cands, ms = on_test[arm]
        arms[arm] = _arm_record(rs.run_reranker(None, test, root, cands, g), test, ms, thresholds, cfg)
        arms[arm]["candidates"] = cands
    comp = _comparison(arms["control"], arms["treatment"], cfg)
    decision = promotion.decide(comp, arms["control"]["latency"], arms["treatment"]["latency"], params["promotion"])
    decision = promotion.apply(decision, tracking_uri(params),
                               {stage: model_fingerprint(paths.asset(stage) / "model") for stage in ARMS.values()})
    out = paths.asset("embedding_promotion")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        comp.reset_index().to_parquet(tmp / "comparison.parquet", index=False)
        for arm, rec in arms.items():
            rec["per_query"].rename_axis("query_id").reset_index().to_parquet(tmp / f"per_query_{arm}.parquet", index=False)
            rec["candidates"].to_parquet(tmp / f"candidates_{arm}.parquet", index=False)
            np.save(tmp / f"latency_{arm}.npy", rec["latency_ms"])
        write_json({"decision": decision.to_dict(), "fingerprint": catalog.meta["fingerprint"],
                    **{arm: {"metrics": rec["metrics"], "thresholds": rec["thresholds"],
                             "latency": rec["latency"], "curve": rec["curve"]} for arm, rec in arms.items()}},
                   tmp / "meta.json")
    metrics = {f"{arm}_{m.replace('@', '_at_').replace('-', '_')}": rec["metrics"][m]["all"]["value"]
               for arm, rec in arms.items() for m in ("I-HR@1", "I-HR@10", "C-HR@1")}
    metrics.update({f"{arm}_latency_p95_ms": rec["latency"]["p95"] for arm, rec in arms.items()})
    metrics.update({"promoted": float(decision.promoted), "diff_I_HR_at_1": float(comp.loc["I-HR@1", "diff"])})
    res = StageResult("embedding_promotion", out, metrics=metrics,
                      info={"decision": "promoted to champion" if decision.promoted else "kept as challenger",
                            "champion": decision.versions.get("champion", ""), "reasons": " | ".join(decision.reasons),
                            "fingerprint": catalog.meta["fingerprint"]},
                      markdown={"comparison": comp.reset_index().to_markdown(index=False, floatfmt=".3g"),
                                "decision_reasons": "\n".join(f"- {r}" for r in decision.reasons)})
    with start_run("embedding_promotion", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        return finish(res, run)


# ------------------------------------------------------------------------------------------ online
def online_ab(params: dict) -> tuple[pd.DataFrame | None, dict]:
    """Click-through per variant (requests with at least one click / requests) with Wilson
    intervals, and the two-proportion test of each variant against the first, from the event log."""
    import sqlite3

    rel = params["ab"].get("event_log")
    path = Paths.from_params(params).workdir / rel if rel else None
    if path is None or not path.is_file():
        return None, {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        imp = pd.read_sql_query("SELECT DISTINCT request_id, variant FROM impressions", db)
        clk = pd.read_sql_query("SELECT DISTINCT request_id FROM clicks", db)
    if imp.empty:
        return None, {}
    imp["clicked"] = imp["request_id"].isin(set(clk["request_id"]))
    g = imp.groupby("variant")["clicked"].agg(["sum", "count"])
    rows, base = [], g.index[0]
    for v, (s, n) in g.iterrows():
        p, lo, hi = proportion_ci(int(s), int(n), params["report"]["alpha"])
        row = {"variant": v, "requests": int(n), "clicked": int(s), "CTR %": 100 * p, "CI low": 100 * lo, "CI high": 100 * hi}
        if v != base:
            t = two_proportion_test(int(g.loc[base, "sum"]), int(g.loc[base, "count"]), int(s), int(n), params["report"]["alpha"])
            row.update({"diff vs " + str(base): 100 * t["diff"], "p": t["p_value"], "significant": t["significant"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table, {"variants": table.to_dict(orient="records"), "event_log": str(path)}


# ------------------------------------------------------------------------------------------ stage 2
def _rerank_arms(params: dict, cfg: dict) -> dict:
    """none / point / list on the served embedder's top-N, one query at a time (latency as served)."""
    paths = Paths.from_params(params)
    root = paths.asset("query_sets")
    catalog = Catalog.load(paths.asset("validated_catalog"))
    _, gallery, g_emb, meta = rs.served_gallery(params)
    test = _queries(params, "test", cfg["rerank_queries_per_level"])
    q_emb = encode_queries(load_embedder(resolve_model(params)), test, root, params["model"]["served_dim"])
    cands = rd.label(rd.retrieve(q_emb, gallery, g_emb, test["query_id"], params["serving"]["candidates"]),
                     test, catalog.items)
    ds = paths.asset("reranker_dataset")
    v_run = rs.run_reranker(None, pd.read_parquet(ds / "val_queries.parquet"), root,
                            pd.read_parquet(ds / "val_candidates.parquet"), gallery)
    arms = {"none": (None, rs.prf(v_run)[1])}
    for kind in ("point", "list"):
        d = paths.asset(rs.RERANK_ASSETS[kind]) / "model"
        arms[kind] = (build_reranker(params, kind), read_json(d / rs.THRESHOLD_FILE))
    out = {}
    for name, (ranker, thr) in arms.items():
        run = rs.run_reranker(ranker, test, root, cands, gallery, block=1)   # one query at a time, as served
        ms = run["ms"] if ranker is not None else np.zeros(len(test))
        out[name] = _arm_record(run, test, ms, thr, cfg)
        out[name]["passes_per_query"] = run["forward_passes"] / max(len(test), 1)
    out["_test"], out["_cands"], out["_gallery"] = test, cands, gallery
    return out


def _top5(items, levels, info: pd.DataFrame) -> list[dict]:
    return [{"image": info.loc[i, "image"] if i in info.index else None,
             "title": str(info.loc[i, "title"]) if i in info.index else str(i), "level": int(lv), "score": None}
            for i, lv in zip(items[:5], levels[:5]) if i is not None]


def _gallery_rows(params: dict, emb: dict, rerank: dict, k: int) -> list[GalleryQuery]:
    """Example queries (spread over noise levels) with each variant's top-5 thumbnails."""
    root = Paths.from_params(params).asset("query_sets")
    test = rerank["_test"]
    info = rerank["_gallery"].drop_duplicates("item_id").set_index("item_id")
    picks = test.groupby("level", group_keys=False).head(max(1, -(-k // 3))).head(k)
    rows = []
    for _, q in picks.iterrows():
        variants = {}
        for label, rec in [(f"embedding {a}", emb[a]) for a in ARMS] + [(f"rerank {n}", rerank[n]) for n in ("none", "point", "list")]:
            at = np.flatnonzero(rec["per_query"].index == q["query_id"])
            if len(at):
                variants[label] = _top5(rec["run"]["items"][at[0]], rec["run"]["levels"][at[0]], info)
        rows.append(GalleryQuery(q["query_id"], str(root / q["image"]) if isinstance(q["image"], str) else None,
                                 q["text"] if isinstance(q["text"], str) else None, q["level"], variants))
    return rows


def _metric_table(records: dict) -> pd.DataFrame:
    rows = []
    for name, rec in records.items():
        row = {"variant": name}
        for m in ("I-HR@1", "I-HR@5", "I-HR@10", "C-HR@1", "C-HR@10", "R@10", "mAP@R", "NDCG@10"):
            v = rec["metrics"][m]["all"]
            row[m] = f"{v['value']:.2f} [{v['ci_low']:.1f}, {v['ci_high']:.1f}]"
        row.update({m: round(v["all"]["value"], 2) for m, v in rec["metrics"].items() if m.endswith(PRF)})
        row.update({"p50 ms": round(rec["latency"]["p50"], 1), "p95 ms": round(rec["latency"]["p95"], 1)})
        rows.append(row)
    return pd.DataFrame(rows)


def _comp_table(comp: pd.DataFrame) -> pd.DataFrame:
    t = comp.reset_index()[["metric", "control", "treatment", "diff", "ci_low", "ci_high", "p_value", "significant"]]
    return t.round({"control": 2, "treatment": 2, "diff": 2, "ci_low": 2, "ci_high": 2, "p_value": 4})


def _restore(prom_dir: Path, cfg: dict) -> dict:
    """The embedding arms as embedding_promotion left them (per-query metrics, latency, items)."""
    meta = read_json(prom_dir / "meta.json")
    out = {}
    for arm in ARMS:
        pq = pd.read_parquet(prom_dir / f"per_query_{arm}.parquet").set_index("query_id")
        c = pd.read_parquet(prom_dir / f"candidates_{arm}.parquet").sort_values(["query_id", "rank"])
        by_q = {q: g for q, g in c.groupby("query_id")}
        n = max((len(g) for g in by_q.values()), default=0)
        items = np.full((len(pq), n), None, dtype=object)
        levels = np.full((len(pq), n), 9)
        for i, q in enumerate(pq.index):
            g = by_q.get(q)
            if g is not None:
                items[i, :len(g)], levels[i, :len(g)] = g["item_id"].to_numpy(), g["level"].to_numpy()
        out[arm] = {"per_query": pq, "metrics": meta[arm]["metrics"], "thresholds": meta[arm]["thresholds"],
                    "latency": meta[arm]["latency"], "latency_ms": np.load(prom_dir / f"latency_{arm}.npy"),
                    "curve": {int(k): v for k, v in meta[arm]["curve"].items()},
                    "run": {"items": items, "levels": levels}}
    return out | {"_decision": meta["decision"]}


def _flat(records: dict, prefix: str) -> dict:
    out = {}
    for name, rec in records.items():
        for m, by_noise in rec["metrics"].items():
            for noise, v in by_noise.items():
                out[f"{prefix}.{name}.{noise}.{m}"] = v["value"]
        out.update({f"{prefix}.{name}.latency_{k}_ms": v for k, v in rec["latency"].items() if k != "n"})
    return {k.replace("@", "_at_"): float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def _strict_json(obj):
    """nan / inf -> null, so metrics.json is standard JSON (jq, browsers) and not Python's NaN."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def ab_report(params: dict, dagster_run_id: str | None = None) -> StageResult:
    """The A/B report: embedding control vs treatment (with the promotion decision), reranking none
    vs pointwise vs listwise-hybrid, calibration, online click-through per variant; one
    self-contained HTML page + metrics.json, everything logged to MLflow."""
    paths, cfg = Paths.from_params(params), params["report"]
    catalog = Catalog.load(paths.asset("validated_catalog"))
    emb = _restore(paths.asset("embedding_promotion"), cfg)
    decision = emb.pop("_decision")
    rerank = _rerank_arms(params, cfg)
    comp_emb = _comparison(emb["control"], emb["treatment"], cfg)
    comp_none = _comparison(rerank["none"], rerank["list"], cfg)
    comp_point = _comparison(rerank["point"], rerank["list"], cfg)
    # the rerank gate: serving.rerank `gated` serves the listwise reranker only on a significant
    # gate-metric win over embedding order within promotion.rerank_latency_budget_ms
    rerank_decision = promotion.decide(comp_none, rerank["none"]["latency"], rerank["list"]["latency"],
                                       params["promotion"], model=rs.RERANK_ASSETS["list"],
                                       budget_key="rerank_latency_budget_ms").to_dict()
    rerank_decision["status"] = ("served by serving.rerank: gated" if rerank_decision["promoted"] else
                                 "not served by serving.rerank: gated (embedding order is)")
    online, online_json = online_ab(params)
    r_list = rerank["list"]["run"]
    filled = r_list["levels_by_rank"] < 9
    calib = {"listwise raw r": (r_list["p_raw"][filled].clip(0, 1), r_list["levels_by_rank"][filled] == 0),
             "listwise calibrated": (r_list["p_instance"][filled].clip(0, 1), r_list["levels_by_rank"][filled] == 0)}
    arms = {f"embedding {a}": emb[a] for a in ARMS} | {f"rerank {n}": rerank[n] for n in ("none", "point", "list")}
    n_emb, n_rr = len(emb["control"]["per_query"]), len(rerank["_test"])
    data = ReportData(
        title="Pailitao-VL A/B report",
        subtitle=f"profile {params['profile']} · catalog {catalog.meta['fingerprint']} · commit {git_commit()[:10]} · "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        decision={"promoted": decision["promoted"], "model": decision["model"],
                  "alias": decision["alias"], "reasons": decision["reasons"]},
        more_decisions=[rerank_decision],
        sections=[
            ("Embedding: contrastive control vs ID-prototype treatment",
             f"{n_emb} unseen test queries against the whole catalog; paired bootstrap over queries "
             f"({cfg['bootstrap']} resamples, {100 * (1 - cfg['alpha']):.0f}% intervals); diff = treatment - control, points.",
             _comp_table(comp_emb)),
            ("Reranking: listwise-hybrid vs embedding order", f"{n_rr} test queries, top-{params['serving']['candidates']} "
             "of the served embedder; diff = listwise - none.", _comp_table(comp_none)),
            ("Reranking: listwise-hybrid vs pointwise", "diff = listwise - pointwise.", _comp_table(comp_point)),
            ("Every variant", "metric [95% CI] in percent; P/R/F1 at thresholds chosen on validation; "
             "latency per query (embedding: embed + exact search; rerank: the reranker alone).", _metric_table(arms))],
        recall_curves={k: v["curve"] for k, v in arms.items()},
        by_noise={k: {n: v["metrics"]["I-HR@1"][n]["value"] for n in v["metrics"]["I-HR@1"] if n != "all"}
                  for k, v in arms.items()},
        latency_ms={k: np.asarray(v["latency_ms"]) for k, v in arms.items()},
        calibration=calib, online=online,
        gallery=_gallery_rows(params, emb, rerank, cfg["gallery"]),
        notes=[f"Reranking forward passes per query: pointwise {rerank['point']['passes_per_query']:.1f}, "
               f"listwise {rerank['list']['passes_per_query']:.1f}.",
               "Online A/B: " + ("no serving event log yet (`pailitao ab simulate` or real traffic writes one)"
                                 if online is None else online_json["event_log"])])
    metrics_json = {
        "profile": params["profile"], "catalog_fingerprint": catalog.meta["fingerprint"], "decision": decision,
        "rerank_decision": rerank_decision,
        "embedding": {a: {"metrics": emb[a]["metrics"], "thresholds": emb[a]["thresholds"], "latency": emb[a]["latency"]}
                      for a in ARMS},
        "embedding_comparison": comp_emb.reset_index().to_dict(orient="records"),
        "reranking": {n: {"metrics": rerank[n]["metrics"], "thresholds": rerank[n]["thresholds"], "latency": rerank[n]["latency"],
                          "forward_passes_per_query": rerank[n]["passes_per_query"]} for n in ("none", "point", "list")},
        "reranking_comparison": {"list_vs_none": comp_none.reset_index().to_dict(orient="records"),
                                 "list_vs_point": comp_point.reset_index().to_dict(orient="records")},
        "calibration": {k: {"ece": float(100 * expected_calibration_error(p, y))} for k, (p, y) in calib.items()},
        "online": online_json}
    out = paths.asset("ab_report")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        render_report(data, tmp / "report.html")
        write_json(_strict_json(metrics_json), tmp / "metrics.json")
        write_json({"fingerprint": catalog.meta["fingerprint"], "decision": decision,
                    "rerank_decision": rerank_decision}, tmp / "meta.json")
    flat = _flat({f"emb_{a}": emb[a] for a in ARMS}, "embedding") | _flat({n: rerank[n] for n in ("none", "point", "list")}, "rerank")
    res = StageResult("ab_report", out,
                      metrics={"promoted": float(decision["promoted"]), "rerank_served": float(rerank_decision["promoted"]),
                               "embedding_diff_I_HR_at_1": float(comp_emb.loc["I-HR@1", "diff"]),
                               "rerank_list_vs_none_diff_I_HR_at_1": float(comp_none.loc["I-HR@1", "diff"]),
                               "rerank_list_vs_point_diff_I_HR_at_1": float(comp_point.loc["I-HR@1", "diff"])},
                      info={"report": str(out / "report.html"),
                            "decision": "promoted to champion" if decision["promoted"] else "kept as challenger",
                            "reasons": " | ".join(decision["reasons"]), "fingerprint": catalog.meta["fingerprint"],
                            "rerank_decision": rerank_decision["status"],
                            "rerank_reasons": " | ".join(rerank_decision["reasons"])},
                      markdown={"decision_reasons": "\n".join(f"- {r}" for r in decision["reasons"]),
                                "rerank_decision_reasons": "\n".join(f"- {r}" for r in rerank_decision["reasons"]),
                                "variants": _metric_table(arms).to_markdown(index=False)})
    with start_run("ab_report", params, catalog.meta["fingerprint"], dagster_run_id) as run:
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(out / "report.html"))
        mlflow.log_artifact(str(out / "metrics.json"))
        return finish(res, run)
