"""The prototype KNN graph ("KNN sparse similarity" / "dynamic proxy update", PAPER.md "Embedding").

Each training step scores the targets plus their rows of a prototype-to-prototype KNN graph,
rebuilt from the current rows every ``refresh_steps`` steps. This module is the one place that
graph is built: ``ring_knn`` for a row set sharded over ranks (what ShardedPrototypeHead runs), and
``knn_graph``, the same builder at world size 1 over all rows (exact; tests and references), plus the
faiss plumbing both need (``build_index`` and one shared GPU resource object).

``ring_knn``: each rank indexes its own rows with faiss (exact ``Flat`` up to ``approx_above``
prototypes, else ``IVF{4 sqrt(n)},Flat`` searched with e.g. "nprobe=16", or any faiss factory
string); then a ring: every rank in turn broadcasts its rows in chunks, all ranks search them in
their local index, and the results are gathered on the owner, which merges the W candidate lists
into its rows' top-k (self excluded). Memory per rank: its own shard plus one chunk; nobody holds
all rows.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from core.gpu import faiss_gpu_available, gpu_resources
from training.head.collectives import comm_device, shard_rows

# faiss GPU brute-force search supports k up to this many results (CPU beyond it).
FAISS_GPU_MAX_K = 2048

def knn_width(num_classes: int, fraction: float) -> int:
    """Negatives per target: ``ceil(fraction * U)``, at most U - 1 (U when fraction >= 1: all)."""
    if fraction >= 1.0:
        return num_classes
    return min(max(math.ceil(fraction * num_classes), 0), num_classes - 1)


def graph_dtype(num_classes: int) -> torch.dtype:
    """Graph ids: int32, int64 only if U >= 2**31."""
    return torch.int32 if num_classes < 2**31 else torch.int64


def default_graph_index(num_classes: int, rows_per_shard: int, approx_above: int) -> str:
    """Exact search for small libraries, IVF (4 sqrt(n) lists per shard) above ``approx_above``."""
    if num_classes <= approx_above:
        return "Flat"
    return f"IVF{max(1, int(4 * math.sqrt(rows_per_shard)))},Flat"


def build_index(rows: Tensor, spec: str, search_params: str = "", chunk: int = 1 << 16,
                seed: int = 0, use_gpu: bool | None = None):
    """faiss inner-product index over the L2-normalised ``rows`` (any dtype/device), added in chunks
    so no full fp32 copy is made besides the index itself. IVF quantisers are trained on a seeded
    sample of 40 rows per list."""
    n, dim = rows.shape
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)

    def normed(a: int, b: int) -> np.ndarray:
        return F.normalize(rows[a:b].detach().float(), dim=-1).cpu().numpy()

    if not index.is_trained:
        try:
            per = 40 * faiss.extract_index_ivf(index).nlist
        except RuntimeError:   # not an IVF index: train on everything
            per = n
        pick = np.sort(np.random.default_rng(seed).choice(n, min(n, per), replace=False))
        index.train(F.normalize(rows[torch.from_numpy(pick).to(rows.device)].detach().float(), dim=-1).cpu().numpy())
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
    for a in range(0, n, chunk):
        index.add(normed(a, min(n, a + chunk)))
    if search_params:
        space = faiss.GpuParameterSpace() if use_gpu else faiss.ParameterSpace()
        space.set_index_parameters(index, search_params)
    return index


@torch.no_grad()
def ring_knn(rows: Tensor, k: int, num_classes: int, *, spec: str = "Flat", search_params: str = "",
             seed: int = 0, use_gpu: bool | None = None, group=None, rank: int = 0, world_size: int = 1,
             chunk: int = 1 << 15) -> Tensor:
    """[len(rows), k] global ids of each local row's k nearest other rows by cosine, nearest first
    (collective over ``group``). ``rows``: this rank's rows of the strided layout over
    ``num_classes`` prototypes; ``spec``/``search_params``: the faiss index (see ``build_index``;
    no search parameters for an exact ``Flat``). Returned in ``graph_dtype(num_classes)``."""
    u, w, me = num_classes, world_size, rank
    dim, row_dtype = rows.shape[1], rows.dtype
    search = "" if spec == "Flat" else search_params   # exact: nothing to tune
    index = build_index(rows, spec, search, seed=seed, use_gpu=use_gpu if k + 1 <= FAISS_GPU_MAX_K else False)
    my_ids = shard_rows(u, me, w)
    out = torch.empty((rows.shape[0], k), dtype=graph_dtype(u))
    dev = comm_device(group)
    for src in range(w):
        n_src = len(range(src, u, w))
        for a in range(0, n_src, chunk):
            m = min(chunk, n_src - a)
            # sent in the row dtype (bf16 rows: half the bytes), normalised by the receivers
            q = rows[a:a + m].to(dev) if src == me else torch.empty((m, dim), dtype=row_dtype, device=dev)
            if group is not None:
                dist.broadcast(q, dist.get_global_rank(group, src), group=group)
            score, idx = index.search(F.normalize(q.float(), dim=-1).cpu().numpy(), k + 1)
            score, idx = torch.from_numpy(score).double(), torch.from_numpy(idx)
            found = idx >= 0
            gid = torch.where(found, idx * w + me, -1)              # local index -> global id
            res = torch.cat([torch.where(found, score, -math.inf), gid.double()], dim=1).to(dev)
            if group is not None:
                gather = [torch.empty_like(res) for _ in range(w)] if src == me else None
                dist.gather(res, gather, dst=dist.get_global_rank(group, src), group=group)
            else:
                gather = [res]
            if src != me:
                continue
            cand = torch.stack(gather).cpu()                        # [W, m, 2 (k+1)]
            score = cand[..., : k + 1].permute(1, 0, 2).reshape(m, -1)
            gid = cand[..., k + 1:].permute(1, 0, 2).reshape(m, -1).long()
            self_id = my_ids[a:a + m].view(-1, 1)
            score = score.masked_fill(gid == self_id, -math.inf)
            best, pos = score.topk(k, dim=1)
            nb = gid.gather(1, pos)
            # a row with fewer than k candidates (tiny IVF lists) pads with itself: harmless in a union
            out[a:a + m] = torch.where(torch.isfinite(best), nb, self_id).to(out.dtype)
    return out


def knn_graph(rows: np.ndarray | Tensor, k: int, use_gpu: bool | None = None) -> np.ndarray:
    """[U, k] int64: for each row, its k nearest *other* rows by cosine similarity, nearest first.

    ``ring_knn`` at world size 1 with an exact ``Flat`` index (faiss GPU when available and k + 1
    is within the GPU search limit). The row itself is removed from its own list, even when
    duplicates tie with it."""
    x = rows.detach().float() if isinstance(rows, Tensor) else torch.from_numpy(np.asarray(rows, dtype=np.float32))
    u = x.shape[0]
    if not 0 <= k <= u - 1:
        raise ValueError(f"k={k} outside 0..{u - 1} for {u} rows")
    if k == 0:
        return np.zeros((u, 0), dtype=np.int64)
    return ring_knn(x, k, u, use_gpu=use_gpu).long().cpu().numpy()
