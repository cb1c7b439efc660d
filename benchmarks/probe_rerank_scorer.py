"""Probe: can an absolute scorer read the instance from a trained listwise reranker's pooled image
states z? z0 / zi from the reranker (frozen) on 400 training chunks, cached; a 4-level MLP on
[z0, zi, |z0 - zi|, z0 * zi] (raw and layer-normed) trained on them; each scored by validation
I-HR@1 (argmax r over each validation query's top 50), beside embedding order, the plain cosine of
z0 and zi, and the reranker's own trained scorer.

    .venv/bin/python benchmarks/probe_rerank_scorer.py W [MODEL_DIR]
W: a lineage with reranker_dataset; MODEL_DIR: default W/data/processed/bench_reranker/full/model.
"""
import sys
import time

import numpy as np
import pandas as pd
import torch
from core.config import Paths, load_params
from pailitao.stages import reranking as rs
from training.reranker import MLLMReranker

torch.set_num_threads(1)
torch.manual_seed(0)
params = load_params("demo", {"workdir": sys.argv[1]})
paths = Paths.from_params(params)
m = MLLMReranker.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else paths.processed / "bench_reranker/full/model")
_, gallery, _, _ = rs.served_gallery(params)
ds = paths.asset("reranker_dataset")
image_of = dict(zip(gallery["image_id"], gallery["image"])); title_of = dict(zip(gallery["item_id"], gallery["title"]))

@torch.no_grad()
def zs(q, docs):
    b = m.prepare([q], [docs])
    h = m.family.forward(m.lm.model, b["input_ids"], b["attention_mask"], b["mm_token_type_ids"], b["pixel_values"], b["image_grid_thw"])
    z = m._pool(h, b["pool_seg"], len(docs) + 1)[0]
    return z[0], z[1:]

t0 = time.time()
chunks, queries = pd.read_parquet(ds / "chunks.parquet"), pd.read_parquet(ds / "queries.parquet").set_index("query_id")
X0, Xi, Y = [], [], []
for qid, g in list(chunks.groupby("query_id"))[:400]:
    q = queries.loc[qid]
    qd = (ds / q["image"], q["text"] if isinstance(q["text"], str) else None, None)
    docs = [(image_of[i], title_of[t], None) for i, t in zip(g["image_id"], g["item_id"])]
    z0, zi = zs(qd, docs)
    X0.append(z0.expand_as(zi)); Xi.append(zi); Y.append(torch.tensor(g["level"].to_numpy()))
X0, Xi, Y = torch.cat(X0), torch.cat(Xi), torch.cat(Y)
print("train pairs", len(Y), "positives", int((Y == 0).sum()), f"{time.time()-t0:.0f}s", flush=True)
vq, vc = pd.read_parquet(ds / "val_queries.parquet"), pd.read_parquet(ds / "val_candidates.parquet")
docs_v = rs.docs_for(vc, gallery); root = paths.asset("query_sets")
V = []
for _, row in vq.iterrows():
    d = docs_v[row["query_id"]]; lv = vc[vc.query_id == row.query_id].sort_values("rank")["level"].to_numpy()
    parts = [zs(rs.query_doc(row, root), d[i:i + 10]) for i in range(0, len(d), 10)]
    V.append((parts[0][0], torch.cat([p[1] for p in parts]), lv))
print("val", len(V), f"{time.time()-t0:.0f}s", flush=True)

def feats(z0, zi, how):
    if how == "norm":
        z0, zi = torch.nn.functional.layer_norm(z0, z0.shape[-1:]), torch.nn.functional.layer_norm(zi, zi.shape[-1:])
    return torch.cat([z0, zi, (z0 - zi).abs(), z0 * zi], -1)

for how in ("raw", "norm"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4 * X0.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 4))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    F = feats(X0, Xi, how)
    for step in range(600):
        idx = torch.randint(len(Y), (256,))
        loss = torch.nn.functional.cross_entropy(net(F[idx]), Y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        hits, base = 0, 0
        for z0, zi, lv in V:
            r = net(feats(z0.expand_as(zi), zi, how)).softmax(-1)[:, 0].numpy()
            hits += lv[np.argmax(r)] == 0; base += lv[0] == 0
    print(how, "final loss", round(float(loss.detach()), 3), "val I-HR@1 by r", round(100 * hits / len(V), 1), "embedding order", round(100 * base / len(V), 1), flush=True)
# the plain cosine of z0 and zi as the score
hits = sum(lv[int(torch.cosine_similarity(z0[None], zi).argmax())] == 0 for z0, zi, lv in V)
print("cos(z0, zi) alone: val I-HR@1", round(100 * hits / len(V), 1))
with torch.no_grad():
    hits = 0
    for z0, zi, lv in V:
        pair = torch.cat([z0.expand_as(zi), zi], -1)
        r = m.scorer(pair).softmax(-1)[:, 0].numpy()
        hits += lv[np.argmax(r)] == 0
    print("the trained scorer on uncached z: val I-HR@1", round(100 * hits / len(V), 1))
    # the same through score() cached vs uncached, on the first val query
    row = vq.iloc[0]; d = docs_v[row["query_id"]][:10]
    a = m.score([rs.query_doc(row, root)], [d], prefix_cache=False)[0]["r"]
    b = m.score([rs.query_doc(row, root)], [d], prefix_cache=True)[0]["r"]
    z0, zi = zs(rs.query_doc(row, root), d)
    c = m.scorer(torch.cat([z0.expand_as(zi), zi], -1)).softmax(-1)[:, 0].numpy()
    print("r uncached", np.round(a, 3)); print("r cached  ", np.round(b, 3)); print("r probe-path", np.round(c, 3))
