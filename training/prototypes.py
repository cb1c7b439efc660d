"""Stage 2: semantic prototype curation (PAPER.md, "Stage 2, global prototype head").

Input: the TRAIN items and one stage-1 embedding per item (L2-normalised, e.g. the mean of its
image embeddings). Output: a library of prototypes (one per product instance) whose normalised
centroids initialise the U x D head of stage 3.

    1. Seeds      one seed per distinct `seed_col` value (group_id = the catalog instance id; an
                  item without one is its own seed, keyed by its item_id). Seed centroid =
                  normalised mean of its members.
    2. Organizer  density-based growth on a faiss kNN graph (IndexFlatIP) over the seed centroids.
                  a) Merge: seeds that are *mutual* k-nearest neighbours with cosine >= threshold are
                     joined (union-find, strongest edge first). This is the "model-proposed link"
                     path that joins duplicate listings of one product under different ids. Edges
                     between a one-item seed and a multi-item seed are left to (b). An edge whose
                     two current clusters' centroids are no longer >= threshold similar is
                     rejected, so a chain A~B~C cannot drag A and C together.
                  b) Absorb: a still-singleton seed (one item) whose nearest multi-member cluster
                     centroid (computed once, after (a): no chaining) is >= threshold joins it.
    3. Reviewer   every cluster of >= 3 members: cosine s_i of each member to the centroid,
                  compared with the mean of the *other* members' cosines (leave-one-out, so an
                  outlier cannot mask itself: with 3 members a plain mean - 2.5 std rule can never
                  fire). Pruned when s_i < mean_others - reviewer_z * std, std = that of the
                  residual s_i - mean_others, estimated from the others (-> the plain rule for
                  large clusters) but floored at the library-wide robust (MAD) residual scale, as
                  2-3 other members give no usable std. An absorbed member must in addition be
                  below the organizer threshold (the bar it was admitted with) to the reviewed
                  centroid, since pruning it costs its label: pruned *absorbed* items lose their
                  prototype (status "pruned"); a pruned *seed* member is split off into its own
                  prototype (status stays "seed"). A cluster's most central member always stays.
                  One pass; centroids are recomputed on the purified clusters.
    4. Output     prototype = normalised centroid of its purified cluster; prototypes sorted by
                  their first seed id (split-offs right after), ids "p000000", "p000001", ...

cfg = params["prototypes"]: organizer_k, organizer_threshold, reviewer_z, optional
reviewer_min_spread (absolute floor of the reviewer's std, default 1e-3). `text_weight` (mixing
title embeddings into the organizer similarity) is not implemented: the organizer is image-only
and a positive value only raises a warning.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

STATUS_SEED, STATUS_ABSORBED, STATUS_PRUNED = "seed", "absorbed", "pruned"
EVENT_KINDS = ("merge", "absorb", "prune")
PROTOTYPE_COLUMNS = ["prototype_id", "members", "n_members", "seed_ids", "purity", "spread",
                     "category", "n_absorbed", "split_from"]
ASSIGNMENT_COLUMNS = ["item_id", "prototype_id", "status", "similarity", "seed_id"]
REPORT_COLUMNS = ["kind", "prototype_id", "other", "similarity", "reason"]
MAD_TO_STD = 1.4826
DEFAULT_MIN_SPREAD = 1e-3   # cosine units: floor of the reviewer's std (identical members)


@dataclass
class CurationResult:
    prototypes: pd.DataFrame   # PROTOTYPE_COLUMNS, row i <-> centroids[i]
    centroids: np.ndarray      # [P, D] float32, L2-normalised
    assignment: pd.DataFrame   # ASSIGNMENT_COLUMNS, one row per input item, input order
    report: pd.DataFrame       # REPORT_COLUMNS, one row per organizer / reviewer event
    stats: dict


def prototype_id(i: int) -> str:
    return f"p{i:06d}"


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_inputs(items: pd.DataFrame, embeddings: np.ndarray) -> np.ndarray:
    if "item_id" not in items.columns:
        raise ValueError("curate: items needs an item_id column")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(items):
        raise ValueError(f"curate: embeddings {emb.shape} not aligned with {len(items)} items")
    if items["item_id"].isna().any():
        raise ValueError("curate: null item_id")
    if items["item_id"].astype(str).duplicated().any():
        raise ValueError("curate: duplicate item_id (one row per item expected)")
    if not np.isfinite(emb).all():
        raise ValueError("curate: non-finite embeddings")
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    if len(norms) and norms.min() < 1e-8:
        raise ValueError("curate: zero embedding")
    return emb.astype(np.float64) / norms[:, None]   # tolerate slightly off-unit input


def _seed_keys(items: pd.DataFrame, seed_col: str) -> list[str]:
    """seed_col value per item; item_id where it is null (prefixed 'item:' if that collides)."""
    item_ids = items["item_id"].astype(str).tolist()
    if seed_col not in items.columns:
        return item_ids
    col = items[seed_col]
    null = col.isna().to_numpy()
    values = col.astype(object).tolist()
    groups = {str(v) for v, n in zip(values, null) if not n}
    return [(iid if iid not in groups else f"item:{iid}") if n else str(v)
            for v, n, iid in zip(values, null, item_ids)]


def _knn(vectors: np.ndarray, k: int) -> np.ndarray:
    """[S, k] indices of each row's k nearest other rows (inner product, exact)."""
    import faiss
    n = len(vectors)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nbrs = index.search(x, k + 1)
    self_hit = nbrs == np.arange(n)[:, None]
    self_hit[~self_hit.any(axis=1), -1] = True   # exact ties can push self out of the list
    return nbrs[~self_hit].reshape(n, k).astype(np.int64)


def _nearest(queries: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss
    index = faiss.IndexFlatIP(targets.shape[1])
    index.add(np.ascontiguousarray(targets, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64), sims[:, 0].astype(np.float64)


def _mutual_edges(nbrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j, each in the other's kNN list."""
    n, k = nbrs.shape
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.repeat(np.arange(n, dtype=np.int64), k)
    j = nbrs.reshape(-1)
    codes = i * n + j
    mutual = np.isin(j * n + i, codes) & (i < j)
    return i[mutual], j[mutual]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return int(root)


def _majority(values: list) -> str | None:
    vals = [str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
            and v is not pd.NA]
    if not vals:
        return None
    counts = pd.Series(vals).value_counts()
    return min(counts.index[counts == counts.max()])   # ties -> smallest name


def curate(items: pd.DataFrame, embeddings: np.ndarray, cfg: dict,
           seed_col: str = "group_id") -> CurationResult:
    """Seeds -> organizer (merge, absorb) -> reviewer (prune) -> prototypes. See module doc."""
    E = _check_inputs(items, embeddings)
    k = int(cfg.get("organizer_k", 10))
    thr = float(cfg.get("organizer_threshold", 0.9))
    z = float(cfg.get("reviewer_z", 2.5))
    min_spread = float(cfg.get("reviewer_min_spread", DEFAULT_MIN_SPREAD))
    if float(cfg.get("text_weight", 0.0) or 0.0) > 0:
        warnings.warn("prototypes.text_weight > 0 is ignored: the organizer is image-only",
                      stacklevel=2)
    item_ids = items["item_id"].astype(str).tolist()
    categories = (items["category"].astype(object).tolist() if "category" in items.columns
                  else [None] * len(items))
    n_items, dim = E.shape

    # 1. Seeds: sorted seed ids, members per seed, normalised mean embedding.
    keys = _seed_keys(items, seed_col)
    seed_ids = sorted(set(keys))
    seed_pos = {s: i for i, s in enumerate(seed_ids)}
    seed_of = np.array([seed_pos[s] for s in keys], dtype=np.int64)
    n_seeds = len(seed_ids)
    member_matrix = sparse.csr_matrix((np.ones(n_items), (seed_of, np.arange(n_items))),
                                      shape=(n_seeds, n_items))
    sums = np.asarray(member_matrix @ E) if n_items else np.zeros((0, dim))   # [S, D] float64
    sizes = np.bincount(seed_of, minlength=n_seeds)
    seed_centroids = _normalize(sums)

    events: list[dict] = []   # 'cluster' = internal root key, resolved to prototype ids at the end

    # 2a. Organizer, merge: mutual-kNN edges >= thr, strongest first, centroid-consistent unions.
    ei, ej = _mutual_edges(_knn(seed_centroids, k))
    esim = np.einsum("ij,ij->i", seed_centroids[ei], seed_centroids[ej])
    keep = (esim >= thr) & ((sizes[ei] == 1) == (sizes[ej] == 1))
    ei, ej, esim = ei[keep], ej[keep], esim[keep]
    order = np.lexsort((ej, ei, -esim))
    uf = _UnionFind(n_seeds)
    n_rejected = 0
    for e in order:
        a, b, s = int(ei[e]), int(ej[e]), float(esim[e])
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            continue
        csim = float(_normalize(sums[ra]) @ _normalize(sums[rb]))
        if csim < thr:
            n_rejected += 1
            continue
        root, gone = min(ra, rb), max(ra, rb)
        uf.parent[gone] = root
        sums[root] += sums[gone]
        sizes[root] += sizes[gone]
        other, partner = (a, b) if ra == gone else (b, a)   # `other`: the seed joining root
        events.append({"kind": "merge", "cluster": root, "other": seed_ids[other],
                       "similarity": s,
                       "reason": f"mutual {k}-NN with seed {seed_ids[partner]}: seed cos {s:.4f}, "
                                 f"cluster centroid cos {csim:.4f} >= {thr}"})
    root_of_seed = np.array([uf.find(i) for i in range(n_seeds)], dtype=np.int64)
    cluster_of = root_of_seed[seed_of]                 # item -> root seed index
    absorbed = np.zeros(n_items, dtype=bool)

    # 2b. Organizer, absorb: long-tail singletons into their nearest multi-member cluster.
    roots = np.flatnonzero(root_of_seed == np.arange(n_seeds))
    multi = roots[sizes[roots] >= 2]
    single_items = np.flatnonzero(sizes[cluster_of] == 1)
    if len(multi) and len(single_items):
        nearest, sims = _nearest(E[single_items], _normalize(sums[multi]))
        for item, t, s in zip(single_items, nearest, sims):
            if s < thr:
                continue
            target = int(multi[t])
            cluster_of[item], absorbed[item] = target, True
            events.append({"kind": "absorb", "cluster": target, "other": item_ids[item],
                           "similarity": float(s),
                           "reason": f"long-tail singleton seed {keys[item]}: nearest cluster "
                                     f"centroid cos {s:.4f} >= {thr}"})

    # 3. Reviewer.
    members_of: dict[int, list[int]] = {}
    for item in sorted(range(n_items), key=lambda j: (int(cluster_of[j]), item_ids[j])):
        members_of.setdefault(int(cluster_of[item]), []).append(item)
    reviewed = {}   # root -> (cos to centroid, leave-one-out mean of the others, their std)
    residuals = []
    for root, m in members_of.items():
        n = len(m)
        if n < 3:   # (two members are always equally far from their mean: nothing to review)
            continue
        s = E[m] @ _normalize(E[m].sum(axis=0))
        mean_o = (s.sum() - s) / (n - 1)
        std_o = np.sqrt(np.maximum(((s * s).sum() - s * s) / (n - 1) - mean_o ** 2, 0.0))
        reviewed[root] = (s, mean_o, std_o * math.sqrt(n / (n - 1)))   # std of s_i - mean_o
        residuals.append(s - mean_o)
    # Pooled robust scale of the residual s_i - mean_others over the whole library: the floor
    # for clusters whose few other members give no usable std of their own.
    res = np.concatenate(residuals) if residuals else np.zeros(0)
    pooled = MAD_TO_STD * float(np.median(np.abs(res - np.median(res)))) if len(res) else 0.0
    floor = max(pooled, min_spread)
    pruned = np.zeros(n_items, dtype=bool)            # absorbed items that lost their prototype
    splits: list[tuple[int, int]] = []                # (seed member item, root it left)
    for root, (s, mean_o, std_o) in reviewed.items():
        m = members_of[root]
        n = len(m)
        drop = []   # (position, reason)
        for pos, item in enumerate(m):
            cutoff = mean_o[pos] - z * max(std_o[pos], floor)
            if s[pos] >= cutoff or (absorbed[item] and s[pos] >= thr):
                continue
            why = f"drift from centroid: cos {s[pos]:.4f} < {cutoff:.4f} (others' mean - {z} * std)"
            drop.append((pos, why + (f" and < threshold {thr}" if absorbed[item] else "")))
        if len(drop) == n:   # never empty a cluster: its most central member stays
            best = int(np.argmax(s))
            drop = [d for d in drop if d[0] != best]
        for pos, why in drop:
            item = m[pos]
            event = {"kind": "prune", "cluster": root, "other": item_ids[item],
                     "similarity": float(s[pos])}
            if absorbed[item]:
                pruned[item] = True
                events.append({**event, "reason": f"absorbed item {why}; unassigned"})
            else:
                splits.append((item, root))
                events.append({**event, "reason": f"seed member {why}", "split_item": item})
        if drop:
            dropped = {m[pos] for pos, _ in drop}
            members_of[root] = [i for i in m if i not in dropped]

    # 4. Prototypes: main clusters (keyed by root seed) and split-offs, in a deterministic order.
    seeds_of_root: dict[int, list[str]] = {}
    for r, root in enumerate(root_of_seed):           # seed ids ascending within each root
        seeds_of_root.setdefault(int(root), []).append(seed_ids[r])
    protos = []   # (sort key, internal key, member items, seed ids, split_from internal key)
    for root, m in members_of.items():
        seeds_in = seeds_of_root[root]
        protos.append(((seeds_in[0], 0, item_ids[m[0]]), ("c", root), m, seeds_in, None))
    for item, root in splits:
        protos.append(((keys[item], 1, item_ids[item]), ("s", item), [item], [keys[item]],
                       ("c", root)))
    protos.sort(key=lambda p: p[0])
    pid = {p[1]: prototype_id(i) for i, p in enumerate(protos)}
    row_of = {p[1]: i for i, p in enumerate(protos)}

    centroids = np.zeros((len(protos), dim), dtype=np.float32)
    rows = []
    proto_of = np.full(n_items, -1, dtype=np.int64)
    for i, (_, key, m, seeds_in, split_from) in enumerate(protos):
        c = _normalize(E[m].sum(axis=0))
        centroids[i] = c
        s = E[m] @ c
        proto_of[m] = i
        rows.append({"prototype_id": pid[key], "members": [item_ids[j] for j in m],
                     "n_members": len(m), "seed_ids": seeds_in, "purity": float(s.mean()),
                     "spread": float(s.std()), "category": _majority([categories[j] for j in m]),
                     "n_absorbed": int(absorbed[m].sum()),
                     "split_from": pid[split_from] if split_from else None})
    prototypes = pd.DataFrame(rows, columns=PROTOTYPE_COLUMNS)
    centroids = _normalize(centroids).astype(np.float32) if len(protos) else centroids

    # Assignment; a pruned item reports its cosine to the centroid of the cluster it left.
    origin = proto_of.copy()
    if pruned.any():
        origin[pruned] = [row_of[("c", int(cluster_of[j]))] for j in np.flatnonzero(pruned)]
    sim = np.einsum("ij,ij->i", E, centroids[origin].astype(np.float64)) if n_items else np.zeros(0)
    assignment = pd.DataFrame({
        "item_id": item_ids,
        "prototype_id": [None if pruned[j] else pid[protos[proto_of[j]][1]] for j in range(n_items)],
        "status": [STATUS_PRUNED if pruned[j] else STATUS_ABSORBED if absorbed[j] else STATUS_SEED
                   for j in range(n_items)],
        "similarity": sim.astype(np.float64),
        "seed_id": keys,
    }, columns=ASSIGNMENT_COLUMNS)

    report_rows = []
    for ev in events:
        reason = ev["reason"]
        if "split_item" in ev:
            reason += f"; split into own prototype {pid[('s', ev['split_item'])]}"
        # a merge names the root at its time; later merges may have folded that root into another
        report_rows.append({"kind": ev["kind"], "prototype_id": pid[("c", uf.find(ev["cluster"]))],
                            "other": ev["other"], "similarity": ev["similarity"],
                            "reason": reason})
    report = pd.DataFrame(report_rows, columns=REPORT_COLUMNS)
    if len(report):
        rank = report["kind"].map({kd: i for i, kd in enumerate(EVENT_KINDS)})
        report = report.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)

    multi_protos = prototypes[prototypes["n_members"] >= 2]
    stats = {
        "items": int(n_items),
        "seeds": int(n_seeds),
        "singleton_seeds": int((np.bincount(seed_of, minlength=n_seeds) == 1).sum()),
        "prototypes": int(len(prototypes)),
        "multi_member_prototypes": int(len(multi_protos)),
        "merges": int(sum(ev["kind"] == "merge" for ev in events)),
        "merges_rejected": int(n_rejected),
        "absorbed": int((absorbed & ~pruned).sum()),
        "pruned": int(pruned.sum()),
        "split": int(len(splits)),
        "assigned": int((~pruned).sum()),
        "mean_purity": float(multi_protos["purity"].mean()) if len(multi_protos) else None,
        "reviewer_floor": float(floor),
    }
    return CurationResult(prototypes=prototypes, centroids=centroids, assignment=assignment,
                          report=report, stats=stats)


def prototype_labels(assignment: pd.DataFrame, prototypes: pd.DataFrame) -> dict[str, int]:
    """item_id -> row index of its prototype in `prototypes` (stage-3 class label); items
    without a prototype (pruned) are left out."""
    row = {p: i for i, p in enumerate(prototypes["prototype_id"].astype(str))}
    kept = assignment[assignment["prototype_id"].notna()]
    return {str(item): row[str(p)] for item, p in zip(kept["item_id"], kept["prototype_id"])}
