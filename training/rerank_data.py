"""Reranker training data: noisy queries of train items, their top-N candidates from the embedding
model (hard negatives for free), graded levels from the judgments, and level-balanced chunks.

A candidate row: query_id, rank (0 = the embedder's best), item_id, image_id, score, level.
A chunk row: query_id, chunk, slot, rank, item_id, image_id, level (slots shuffled)."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.judgments import pair_levels
from data.noise import noise_text
from data.queries import noise_seed, render_queries
from data.splits import unit_hash


def train_queries(items: pd.DataFrame, reranker: dict, queries: dict, noise: dict, seed: int, out_dir: Path,
                  workers: int = 1) -> pd.DataFrame:
    """Noisy shopper-style queries of a deterministic sample of train items (`items`: item_id,
    group_id, title, image = absolute catalog file), written as JPEG under out_dir/images:
    `train_queries` in all, `queries_per_item` per item (each a different noise draw, the levels
    taken in turn, so every level is trained as every level is served).
    reranker, queries, noise, seed: params["reranker"], params["queries"] (its image_quality),
    params["noise"], params["seed"].
    Returns query_id, item_id, group_id, level, image (relative to out_dir), text."""
    cfg = reranker
    per_item = max(1, int(cfg.get("queries_per_item", 1)))
    order = sorted(items["item_id"], key=lambda i: unit_hash("rerank-q", seed, i))
    n_items = min(len(order), -(-int(cfg["train_queries"]) // per_item))
    pick = items.set_index("item_id").loc[order[:n_items]].reset_index()
    pool = items["image"].tolist()
    rows, tasks = [], []
    for n in range(min(int(cfg["train_queries"]), n_items * per_item)):
        i, rnd = n % n_items, n // n_items   # rounds: each covers every picked item once
        r = pick.iloc[i]
        level = cfg["query_levels"][(i + rnd) % len(cfg["query_levels"])]   # an item's rounds take the levels in turn
        s = noise_seed("rerank-noise", seed, r.item_id, rnd)
        rng = np.random.default_rng(s)
        qid = f"train-{level}-{n:06d}"
        rel = f"images/{qid}.jpg"
        tasks.append({"src": r.image, "backgrounds": [pool[j] for j in rng.integers(len(pool), size=2)],
                      "level": level, "cfg": noise[level], "seed": s, "dst": rel,
                      "format": "JPEG", "quality": queries["image_quality"]})
        text = noise_text(r.title, level, noise[level], s) if rng.random() < cfg["text_share"] else None
        rows.append({"query_id": qid, "item_id": r.item_id, "group_id": r.group_id, "level": level,
                     "image": rel, "text": text})
    render_queries(tasks, out_dir, workers)
    return pd.DataFrame(rows)


def retrieve(q_emb: np.ndarray, gallery: pd.DataFrame, g_emb: np.ndarray, query_ids, n: int) -> pd.DataFrame:
    """Top-n distinct items per query by exact inner product (an item with several images keeps
    its best one). gallery: image_id, item_id, ... aligned with g_emb."""
    index = faiss.IndexFlatIP(g_emb.shape[1])
    index.add(np.ascontiguousarray(g_emb, dtype=np.float32))
    scores, nn = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(len(gallery), 3 * n))
    items, images = gallery["item_id"].to_numpy(), gallery["image_id"].to_numpy()
    rows = []
    for qid, sc, row in zip(query_ids, scores, nn):
        seen: set = set()
        for s, j in zip(sc, row):
            if j < 0 or items[j] in seen:
                continue
            seen.add(items[j])
            rows.append((qid, len(seen) - 1, items[j], images[j], float(s)))
            if len(seen) == n:
                break
    return pd.DataFrame(rows, columns=["query_id", "rank", "item_id", "image_id", "score"])


def label(cands: pd.DataFrame, queries: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Add each candidate's level (0 instance .. 3 irrelevant) against its query's target item."""
    meta = items.set_index("item_id")[["group_id", "category"]]
    target = queries.set_index("query_id")["item_id"].reindex(cands["query_id"]).to_numpy()
    tq, td = meta.reindex(target), meta.reindex(cands["item_id"].to_numpy())
    level = pair_levels(tq["group_id"], tq["category"], td["group_id"], td["category"])
    return cands.assign(level=level)


def training_chunks(cands: pd.DataFrame, m: int, instance_share: float, seed: int,
                    positives: pd.DataFrame | None = None) -> pd.DataFrame:
    """One chunk of at most m candidates per query, balanced over levels: with probability
    instance_share the chunk holds the query's instance match when retrieval found it (within the
    top-N, as at inference: an instance the embedder did not retrieve is never a reranker's
    candidate, so planting it taught scores on a distribution that never comes). `positives`
    (query_id, item_id, image_id, rank) may name near misses retrieved beyond the top-N; they go in
    as the instance when the top-N lacks it (rank kept, so they are told apart in the data). The
    other slots are drawn with weights inversely proportional to each level's frequency in the
    pool, so the rare concept and functional matches are seen. Slots are shuffled: in retrieval
    order the instance sat in slot 0 of half the chunks and the listwise head learned the slot."""
    freq = cands["level"].value_counts(normalize=True)
    pos = positives.set_index("query_id") if positives is not None and len(positives) else None
    out = []
    for qid, g in cands.groupby("query_id", sort=True):
        rng = np.random.default_rng(noise_seed("rerank-chunk", seed, qid))
        inst = g[g["level"] == 0]
        want_instance = rng.random() < instance_share
        keep = inst.head(1) if len(inst) and want_instance else inst.iloc[:0]
        if want_instance and not len(inst) and pos is not None and qid in pos.index:
            keep = pos.loc[[qid]].head(1).reset_index()   # the nearest near miss (a level-0 row)
        rest = g[g["level"] != 0]
        k = min(m - len(keep), len(rest))
        w = 1.0 / rest["level"].map(freq).to_numpy()
        pick = rest.iloc[rng.choice(len(rest), size=k, replace=False, p=w / w.sum())] if k else rest.iloc[:0]
        chunk = pd.concat([keep, pick])
        chunk = chunk.iloc[rng.permutation(len(chunk))]
        out.append(chunk.assign(chunk=0, slot=np.arange(len(chunk))))
    cols = ["query_id", "chunk", "slot", "rank", "item_id", "image_id", "level"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def level_stats(df: pd.DataFrame, prefix: str) -> dict:
    counts = df["level"].value_counts().reindex(range(4), fill_value=0)
    return {f"{prefix}_level{lv}": int(c) for lv, c in counts.items()}


class RerankSet(torch.utils.data.Dataset):
    """Training samples from chunks. list: one sample per chunk (query + its candidates);
    point: one sample per (query, candidate) pair of the same chunks."""

    def __init__(self, chunks: pd.DataFrame, queries: pd.DataFrame, query_root: Path,
                 image_of: dict, title_of: dict, mode: str):
        self.q = queries.set_index("query_id")
        self.root, self.image_of, self.title_of, self.mode = Path(query_root), image_of, title_of, mode
        groups = [g for _, g in chunks.groupby(["query_id", "chunk"], sort=True)]
        self.samples = groups if mode == "list" else [r.to_frame().T for g in groups for _, r in g.iterrows()]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        g = self.samples[i]
        q = self.q.loc[g["query_id"].iloc[0]]
        text = q["text"] if isinstance(q["text"], str) else None
        query = (Image.open(self.root / q["image"]).convert("RGB"), text, None)
        docs = [(Image.open(self.image_of[im]).convert("RGB"), self.title_of[it], None)
                for im, it in zip(g["image_id"], g["item_id"])]
        return {"query": query, "docs": docs, "levels": torch.tensor(g["level"].astype(int).to_numpy())}


class RankShare(torch.utils.data.Sampler):
    """Every world-th index of `sampler`'s order under DDP (read at iteration time, when the
    process group exists), so each rank trains on its own share: fit() turns Lightning's own
    distributed sampler off. One process: the order unchanged."""

    def __init__(self, sampler: torch.utils.data.Sampler):
        self.sampler = sampler

    def __iter__(self):
        order = list(self.sampler)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            order = order[rank::world][: len(order) // world] or order[:1]   # the same length on every rank
        yield from order

    def __len__(self) -> int:
        return len(self.sampler)


def train_sampler(data: RerankSet, positive_share: float | None, seed: int) -> torch.utils.data.Sampler:
    """Shuffled samples (each DDP rank its share); in point mode with positive_share, drawn with
    replacement so that share of pairs are instance matches (about 5% are: a plain shuffle let the
    model learn to say "no")."""
    gen = torch.Generator().manual_seed(seed)
    if data.mode == "list" or not positive_share:
        return RankShare(torch.utils.data.RandomSampler(data, generator=gen))
    pos = np.array([int(g["level"].iloc[0]) == 0 for g in data.samples])
    if not pos.any() or pos.all():
        return RankShare(torch.utils.data.RandomSampler(data, generator=gen))
    w = np.where(pos, positive_share / pos.sum(), (1 - positive_share) / (~pos).sum())
    return RankShare(torch.utils.data.WeightedRandomSampler(torch.as_tensor(w), num_samples=len(data),
                                                            replacement=True, generator=gen))


def collate(samples: list[dict]) -> dict:
    m = max(len(s["levels"]) for s in samples)
    levels = torch.full((len(samples), m), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        levels[i, : len(s["levels"])] = s["levels"]
    return {"queries": [s["query"] for s in samples], "docs": [s["docs"] for s in samples], "levels": levels}
