"""Probe: does anything a second stage can compute on this base model carry the instance beyond the
served embedder's own score? Each signal is fused with the retrieval score (its cosine and gap to
the query's best) by a logistic regression fit on the validation queries (reranker_dataset), then
scored on unseen test queries (100 a noise level, their top 50 from the served embedder, as
bench_reranker.py) by I-HR@1, with a paired bootstrap against embedding order.

Signals:
  tokens  the listwise reranker's decoder states at the image tokens (chunks of 10, round robin, as
          served): cosine of the pooled states, late interaction (mean of each token's best match,
          both ways), the best token pair, the best query token against the pooled candidate;
          `--grid` sets the image tokens per side (the model's own is 2)
  crops   the served embedder on crops of the query photo (centre 0.75 / 0.55, four corners 0.6,
          with the query's words): each crop's cosine to each candidate, and their max
  metric  a learned re-weighting of the embedding's dimensions, s = a cos(q, c) + sum_d w_d q_d c_d,
          trained with a softmax over each training query's top 50 (reranker_dataset), chosen on val

    .venv/bin/python benchmarks/probe_rerank_signals.py W [--signals tokens,crops,metric] [--grid 2]
W: a lineage through reranker_model (`make demo`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).parent))
import bench_reranker as br  # noqa: E402
from core.config import Paths, load_params  # noqa: E402
from evaluation.compare import paired_bootstrap  # noqa: E402
from evaluation.retrieval import encode_queries  # noqa: E402
from pailitao.stages import reranking as rs  # noqa: E402
from retrieval.merge import assign_chunks  # noqa: E402
from retrieval.models import load_embedder, resolve_model  # noqa: E402
from training.reranker import MLLMReranker  # noqa: E402
from training.vlm import use_feature_cache  # noqa: E402

TOKEN_FEATURES = ["pooled_cos", "late_cand", "late_query", "best_pair", "best_query_token"]
BOXES = {"centre_75": (0.125, 0.125, 0.875, 0.875), "centre_55": (0.225, 0.225, 0.775, 0.775),
         "top_left": (0, 0, 0.6, 0.6), "top_right": (0.4, 0, 1, 0.6),
         "bottom_left": (0, 0.4, 0.6, 1), "bottom_right": (0.4, 0.4, 1, 1)}


class Split:
    """One query set's top-50 (retrieval order): queries, candidates by query, levels [Q, 50],
    retrieval scores [Q, 50], the catalog rows of the candidates [Q, 50]."""

    def __init__(self, queries: pd.DataFrame, cands: pd.DataFrame, root: Path, row_of: dict):
        self.queries, self.root = queries.reset_index(drop=True), root
        by_q = {q: g.sort_values("rank") for q, g in cands.groupby("query_id")}
        self.by_q = [by_q[q] for q in self.queries["query_id"]]
        self.levels = np.stack([g["level"].to_numpy() for g in self.by_q])
        self.first = np.stack([g["score"].to_numpy() for g in self.by_q])
        self.rows = np.stack([[row_of[i] for i in g["image_id"]] for g in self.by_q])
        self.groups = self.queries["level"].to_numpy()


def token_signals(split: Split, model: MLLMReranker, gallery: pd.DataFrame) -> dict[str, np.ndarray]:
    docs = rs.docs_for(pd.concat(split.by_q), gallery)
    out = np.zeros(split.levels.shape + (len(TOKEN_FEATURES),))
    with torch.no_grad():
        for k, row in split.queries.iterrows():
            d = docs[row["query_id"]]
            chunks = assign_chunks(len(d), 10, "round_robin")
            b = model.prepare([rs.query_doc(row, split.root)] * len(chunks), [[d[i] for i in c] for c in chunks])
            h = F.normalize(model.family.forward(model.lm.model, b["input_ids"], b["attention_mask"],
                                                 b["mm_token_type_ids"], b["pixel_values"],
                                                 b["image_grid_thw"]).float(), dim=-1)
            for r, c in enumerate(chunks):
                q = h[r][b["pool_seg"][r] == 0]
                zq = F.normalize(q.mean(0), dim=-1)
                for j, pos in enumerate(c):
                    t = h[r][b["pool_seg"][r] == j + 1]
                    s, zc = t @ q.T, F.normalize(t.mean(0), dim=-1)
                    out[k, pos] = [float(zq @ zc), float(s.max(1).values.mean()), float(s.max(0).values.mean()),
                                   float(s.max()), float((q @ zc).max())]
    return {n: out[..., i] for i, n in enumerate(TOKEN_FEATURES)}


def crop_signals(split: Split, embedder, g_emb: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    images, texts = [], []
    for _, r in split.queries.iterrows():
        im = Image.open(split.root / r["image"]).convert("RGB")
        w, h = im.size
        images += [im.crop((round(a * w), round(b * h), round(c * w), round(d * h))) for a, b, c, d in BOXES.values()]
        texts += [r["text"] if isinstance(r["text"], str) else None] * len(BOXES)
    e = embedder.encode(images, texts, batch_size=64, dim=dim).reshape(len(split.queries), len(BOXES), -1)
    sims = np.einsum("qnd,qkd->qnk", g_emb[split.rows], e)
    return {**{n: sims[..., i] for i, n in enumerate(BOXES)}, "best_crop": sims.max(-1)}


def metric_signal(train: Split, train_q: np.ndarray, val: Split, val_q: np.ndarray, test: Split, test_q: np.ndarray,
                  g_emb: np.ndarray, epochs: int = 300) -> tuple[dict, dict]:
    """The re-weighted cosine of val and test, trained on `train`, the weights chosen at the best
    validation I-HR@1."""
    torch.manual_seed(0)
    tensors = lambda s, q: (torch.tensor(q), torch.tensor(g_emb[s.rows]))  # noqa: E731
    (q, c), has = tensors(train, train_q), torch.tensor((train.levels == 0).any(1))
    q, c = q[has], c[has]
    target = torch.tensor(train.levels[has.numpy()] == 0).float()
    w, a = torch.zeros(q.shape[1], requires_grad=True), torch.tensor(20.0, requires_grad=True)
    score = lambda q, c: ((q[:, None] * c) * (a + 20 * w)).sum(-1)  # noqa: E731
    opt, best = torch.optim.Adam([w, a], lr=0.01), (-1.0, None)
    vq, vc = tensors(val, val_q)
    for ep in range(epochs):
        loss = -(torch.log_softmax(score(q, c), 1) * target / target.sum(1, keepdim=True)).sum(1).mean()
        opt.zero_grad()
        (loss + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
        with torch.no_grad():
            v = hit1(score(vq, vc).numpy(), val.levels).mean()
        if v > best[0]:
            best = (v, (w.detach().clone(), a.detach().clone()))
    w, a = best[1]
    with torch.no_grad():
        return tuple({"learned_metric": score(*tensors(s, e)).numpy()} for s, e in ((val, val_q), (test, test_q)))


def hit1(scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
    return (levels[np.arange(len(levels)), np.argmax(scores, 1)] == 0).astype(float)


def design(split: Split, sig: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """[Q, 50, f]: retrieval score and gap, then each signal and its gap to the query's best."""
    parts = [split.first, split.first - split.first.max(1, keepdims=True)]
    for n in names:
        parts += [sig[n], sig[n] - sig[n].max(1, keepdims=True)]
    return np.stack(parts, -1)


def fused(val: Split, vsig: dict, test: Split, tsig: dict, names: list[str], c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    xv, xt = design(val, vsig, names), design(test, tsig, names)
    flat = xv.reshape(-1, xv.shape[-1])
    mu, sd = flat.mean(0), flat.std(0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=2000).fit((flat - mu) / sd, (val.levels == 0).ravel())
    f = lambda x: lr.decision_function(((x - mu) / sd).reshape(-1, x.shape[-1])).reshape(x.shape[:2])  # noqa: E731
    return f(xv), f(xt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--signals", default="tokens,crops,metric")
    ap.add_argument("--grid", type=int, default=None, help="reranker image tokens per side (default: the model's)")
    ap.add_argument("--per-level", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rerank_signals.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = load_params(args.profile, {"workdir": args.workdir})
    paths = Paths.from_params(params)
    use_feature_cache(paths.feature_cache)
    dim, ds, qs = params["model"]["served_dim"], paths.asset("reranker_dataset"), paths.asset("query_sets")
    _, gallery, g_emb, _ = rs.served_gallery(params)
    row_of = {i: k for k, i in enumerate(gallery["image_id"])}
    val = Split(pd.read_parquet(ds / "val_queries.parquet"), pd.read_parquet(ds / "val_candidates.parquet"), qs, row_of)
    tq, tc, _ = br.test_set(params, args.per_level)
    test = Split(tq, tc, qs, row_of)
    embedder = load_embedder(resolve_model(params))
    vsig, tsig, families = {}, {}, {}
    wanted = args.signals.split(",")
    if "tokens" in wanted:
        model = MLLMReranker.from_pretrained(paths.asset("reranker_model") / "model", cache_mb=512).eval()
        if args.grid:
            model.lm.model.config.image_grid = args.grid
        for s, sig in ((val, vsig), (test, tsig)):
            sig.update(token_signals(s, model, gallery))
        families["tokens"] = TOKEN_FEATURES
    if "crops" in wanted:
        for s, sig in ((val, vsig), (test, tsig)):
            sig.update(crop_signals(s, embedder, g_emb, dim))
        families["crops"] = [*BOXES, "best_crop"]
    if "metric" in wanted:
        train = Split(pd.read_parquet(ds / "queries.parquet"), pd.read_parquet(ds / "candidates.parquet"), ds, row_of)
        enc = lambda s: encode_queries(embedder, s.queries, s.root, dim)  # noqa: E731
        v, t = metric_signal(train, enc(train), val, enc(val), test, enc(test), g_emb)
        vsig.update(v)
        tsig.update(t)
        families["metric"] = ["learned_metric"]
    base_v, base_t = (val.levels[:, 0] == 0).astype(float), (test.levels[:, 0] == 0).astype(float)   # embedding order
    rows = [{"signal": "embedding order", "val": 100 * base_v.mean(), "test": 100 * base_t.mean(),
             "test_in_top50": 100 * (test.levels == 0).any(1).mean()}]
    for fam, names in families.items():
        for names_ in [[n] for n in names] + ([names] if len(names) > 1 else []):
            alone = hit1(tsig[names_[0]], test.levels).mean() * 100 if len(names_) == 1 else None
            sv, st = fused(val, vsig, test, tsig, names_)
            ht = hit1(st, test.levels)
            pb = paired_bootstrap(base_t, ht, n_boot=4000)
            rows.append({"signal": f"{fam}: {' + '.join(names_) if len(names_) < 3 else 'all'}", "alone_test": alone,
                         "val": 100 * hit1(sv, val.levels).mean(), "test": 100 * ht.mean(),
                         "minus_order": 100 * pb["diff"], "ci": [100 * pb["ci_low"], 100 * pb["ci_high"]],
                         "p": pb["p_value"], **{g: 100 * (ht - base_t)[test.groups == g].mean()
                                                    for g in ("clean", "mild", "hard")}})
    print("| signal | alone (test) | fused, val | fused, test | minus embedding order [95% CI], p | clean / mild / hard |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "minus_order" not in r:
            print(f"| {r['signal']} | - | {r['val']:.1f} | {r['test']:.1f} (top 50 holds it: {r['test_in_top50']:.1f}) | - | - |")
            continue
        alone = "-" if r["alone_test"] is None else f"{r['alone_test']:.1f}"
        print(f"| {r['signal']} | {alone} | {r['val']:.1f} | {r['test']:.1f} | {r['minus_order']:+.2f} "
              f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}], p {r['p']:.2f} | "
              f"{r['clean']:+.1f} / {r['mild']:+.1f} / {r['hard']:+.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"grid": args.grid, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
