"""Tensor-parallel prototype head for a billion-scale library (PAPER.md "Scale"; GitHub issue #4).

The backbone is data parallel (DDP); the U prototype rows are sharded across the same ranks
(style of insightface ``partial_fc_v2``). One step, for a global batch of N = sum of the local
batches:

1. The embeddings and labels are all-gathered (``_AllGather``: ``all_gather_single`` forward,
   ``reduce_scatter_single`` backward, so gradients flow back to every rank's backbone output).
2. Every rank selects the same scored set ``cls``: the targets plus the union of their rows of the
   prototype KNN graph (each rank keeps the graph rows of its own prototypes; the owners' rows are
   combined by one integer all-reduce), or the same number of uniform random classes from an RNG
   that is identical on every rank.
3. Each rank scores only its own selected rows: logits ``[P prefixes, N, C_local]``, the margin on
   the target column done by ``training.losses.arcface_logits`` on the owning rank. The softmax is
   distributed (``_DistCrossEntropy``): all-reduce MAX of the row maxima, one all-reduce SUM of
   (sum of exponentials, target logit). No rank ever holds the full [N, U] (or [N, C]) logits.

Layout: strided. Global row ``i`` lives on rank ``i % W`` at local index ``i // W``. Prototype ids
handed out by curation are grouped by category and a target's neighbours are usually in its own
category, so a contiguous split would put most of a step's scored rows (and its compute) on one
rank; striding spreads every id range over all ranks. Re-sharding to another world size is an
index computation (``load_sharded``).

Gradient scaling (why the backbone gradient is exact under DDP): each rank's loss value is the
global-batch loss ``L = (1/N) sum_i CE_i`` (identical on all ranks), and ``_DistCrossEntropy``'s
backward returns the exact ``dL/dlogits`` for the local columns. So each rank's rows get exactly
``dL/dw`` (no averaging: the rows are not DDP parameters), and the gathered embeddings get each
rank's share of ``dL/dh``; the all-gather's backward sums the shares over ranks, giving rank r the
full ``dL/dh_r`` for its own samples. DDP then *averages* backbone gradients over W ranks, while
the reference gradient on the concatenated batch is their *sum*; hence the local embeddings'
gradient is multiplied by W (in ``_AllGather``'s backward) and ``h.grad == W * dL/dh_r``. After DDP's average the
backbone gradient equals the single-process one on the global batch (tests/test_sharded_head.py).

The rows are *not* an ``nn.Parameter`` or a registered buffer (DDP must neither average nor
broadcast them): they are plain tensors. Each forward gathers a fp32 leaf
``w = rows[local_cls].float().requires_grad_()``; ``sparse_sgd_step`` applies lazy momentum SGD
from ``w.grad`` to exactly those rows (sparse by construction; gradient accumulation over several
forwards is summed like a ``.grad``).

Dtypes: rows in ``row_dtype`` (fp32, or bf16/fp16 to halve memory). The fp32 master copy exists
only for the touched rows during a step; low-precision rows are written back with *stochastic
rounding* from a counter-based hash of (seed, step, row id, column), so updates far below one ulp
are kept in expectation, and the result does not depend on the world size or on the RNG state.
The momentum buffer is ``momentum_dtype`` (fp32 by default; bf16 halves it again, rounded to
nearest). The KNN graph is int32 [U/W, k] (int64 only if U >= 2**31).

KNN graph ("dynamic proxy update", every ``refresh_steps`` steps): each rank indexes its own rows
with faiss (exact ``Flat`` up to ``approx_above`` prototypes, else ``IVF{4 sqrt(n)},Flat`` with
``graph_search`` = "nprobe=16", or any faiss factory string); then a ring: every rank in turn
broadcasts its normalised rows in chunks, all ranks search them in their local index, and the
results are gathered on the owner, which merges the W candidate lists into its rows' top-k
(self excluded). Memory per rank: its own shard plus one chunk; nobody holds all rows.

Checkpoints: ``save_sharded(dir)`` writes ``rank{r}.pt`` (rows, momentum, graph, step, refresh
counter, sampler RNG) per rank plus ``meta.json``; ``load_sharded(dir)`` reads them into any world
size (memory-mapped, each rank reads only its own rows).

``head_cost`` is the memory / communication model used by benchmarks/bench_head_scale.py and
docs/sharded_head.md.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from training.losses import arcface_logits, mrl_prefix
from training.margin_head import knn_width, random_select

_ROW_DTYPES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
ROW_UPDATES = ("sgd", "ema", "frozen")
_RANDPERM_MAX = 1 << 16   # up to here the random sampler is margin_head.random_select (exact parity)
_FAISS_GPU_MAX_K = 2048
_M32 = 0xFFFFFFFF
# torch 2.13 names (the *_tensor spellings are deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- layout and groups
def shard_rows(num_rows: int, rank: int, world_size: int) -> Tensor:
    """Global ids of the rows owned by ``rank``: ``rank, rank + W, rank + 2W, ...``."""
    return torch.arange(rank, num_rows, world_size)


def _group_info(group) -> tuple[object, int, int]:
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


# --------------------------------------------------------------------------- autograd pieces
class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 (same shape on every rank). Backward: reduce-scatter, i.e. each rank
    gets the sum over ranks of the gradient of its own slice, times ``scale`` (= W, because DDP
    averages the backbone gradients over ranks while the global loss needs their sum)."""

    @staticmethod
    def forward(ctx, x, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty((g.shape[0] // ctx.world, *g.shape[1:]))
        _reduce_scatter_single(gx, g.contiguous(), group=ctx.group)
        return gx * ctx.scale, None, None, None


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over the global batch, classes split across ranks.

    ``logits`` [P, N, C_local] (this rank's columns), ``target`` [N]: the local column of sample
    i's class, or -1 where another rank owns it. Returns the per-prefix losses [P], identical on all
    ranks; the backward gives the exact gradient for the local columns, ``(softmax - onehot) / N``.
    """

    @staticmethod
    def forward(ctx, logits, target, group, n_global):
        p, n, c = logits.shape
        row_max = logits.amax(dim=-1) if c else logits.new_full((p, n), -math.inf)
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        ex = torch.exp(logits - row_max.unsqueeze(-1))
        owned = torch.nonzero(target >= 0).view(-1)
        sums = logits.new_zeros((2, p, n))
        sums[0] = ex.sum(dim=-1)
        sums[1][:, owned] = logits[:, owned, target[owned]]      # target logit, from its owner only
        if group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        loss = (torch.log(sums[0]) + row_max - sums[1]).sum(dim=1) / n_global
        ex /= sums[0].unsqueeze(-1)                              # softmax over all ranks' columns
        ctx.save_for_backward(ex, owned, target[owned])
        ctx.n_global = n_global
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        prob, owned, cols = ctx.saved_tensors
        grad = prob.clone()
        grad[:, owned, cols] -= 1.0
        grad *= (grad_loss / ctx.n_global).view(-1, 1, 1)
        return grad, None, None, None


# --------------------------------------------------------------------------- KNN graph pieces
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
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    for a in range(0, n, chunk):
        index.add(normed(a, min(n, a + chunk)))
    if search_params:
        space = faiss.GpuParameterSpace() if use_gpu else faiss.ParameterSpace()
        space.set_index_parameters(index, search_params)
    return index


_gpu_res = None


def _gpu_resources():
    global _gpu_res
    if _gpu_res is None:
        _gpu_res = faiss.StandardGpuResources()
    return _gpu_res


def random_select_large(targets: Tensor, total: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Like ``margin_head.random_select`` (sorted unique targets plus uniform random other classes,
    ``total`` in all) in O(total) instead of O(U): draw with replacement, drop targets and repeats,
    then keep a random subset of the right size. Every step of it is invariant under relabelling the
    non-target classes, so the chosen subset is uniform."""
    device = targets.device
    targets = torch.unique(targets.long().view(-1).cpu(), sorted=True)
    extra = min(total, num_classes) - targets.numel()
    picked = torch.zeros(0, dtype=torch.long)
    while picked.numel() < extra:
        draw = torch.randint(num_classes, (2 * (extra - picked.numel()) + 16,), generator=generator)
        picked = torch.unique(torch.cat([picked, draw]))
        picked = picked[~torch.isin(picked, targets)]
    if picked.numel() > extra:
        picked = picked[torch.randperm(picked.numel(), generator=generator)[:extra]]
    return torch.unique(torch.cat([targets, picked]), sorted=True).to(device)


# --------------------------------------------------------------------------- stochastic rounding
def _mix32(x: Tensor) -> Tensor:
    """32-bit integer hash on int64 tensors holding values < 2**32 (multipliers < 2**31: no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B) & _M32
    return x ^ (x >> 16)


def hash_uniform(row_ids: Tensor, dim: int, step: int, seed: int) -> Tensor:
    """[n, dim] uniforms in [0, 1) that depend only on (seed, step, global row id, column)."""
    ids = row_ids.long().view(-1, 1)
    key = _mix32(torch.tensor((seed * 0x9E3779B1 + step) & _M32, device=ids.device))
    r = _mix32(_mix32((ids & _M32) ^ key) ^ (ids >> 32))
    cols = torch.arange(dim, device=ids.device).view(1, -1)
    return (_mix32((r + cols * 0x61C88647) & _M32) >> 8).float() / float(1 << 24)


def stochastic_round(x: Tensor, dtype: torch.dtype, u: Tensor) -> Tensor:
    """Round fp32 ``x`` to ``dtype``, up or down with probabilities making ``E[result] == x``."""
    if dtype == torch.float32:
        return x
    near = x.to(dtype)
    nf = near.float()
    toward = torch.full_like(near, math.inf).masked_fill_(nf > x, -math.inf)
    other = torch.nextafter(near, toward)                     # the representable value across x
    p_other = ((x - nf) / (other.float() - nf)).abs().nan_to_num_(0.0)
    return torch.where(u < p_other, other, near)


# --------------------------------------------------------------------------- cost model
def head_cost(num_classes: int, dim: int, world_size: int, row_bytes: int = 4, batch: int = 256,
              knn_k: int | None = 64, fraction: float | None = None, momentum_bytes: int = 4,
              emb_bytes: int = 2, num_prefixes: int = 1, refresh_steps: int = 50,
              gpu_bytes: float = 80e9, reserve_bytes: float = 0.0, index_on_gpu: bool = True) -> dict:
    """Memory (bytes per shard), GPUs needed and communication (bytes per rank per step) of the head.

    ``batch`` is the global batch N; the scored set is at most ``N * (k + 1)`` classes with k
    neighbours per target (``knn_k``), or ``k = ceil(fraction * U)`` when ``fraction`` is given.
    Ring collectives: an all-gather moves (W-1)/W of the total to each rank, an all-reduce 2(W-1)/W.
    ``reserve_bytes`` is what the backbone, its optimizer and activations need on every GPU;
    ``index_on_gpu=False``: the refresh's faiss index (fp32 copy of the shard) lives in host RAM
    (``graph_gpu=False``) and does not count against the GPU.
    """
    u, d, w, n = int(num_classes), int(dim), int(world_size), int(batch)
    k = knn_width(u, fraction) if fraction is not None else int(knn_k or 0)
    classes = min(u, n * (k + 1))
    graph_bytes = 4 if u < 2**31 else 8

    def shard(w_: int) -> dict:
        rows_local = math.ceil(u / w_)
        c_local = math.ceil(classes / w_)
        persistent = {"rows": rows_local * d * row_bytes, "momentum": rows_local * d * momentum_bytes,
                      "graph": rows_local * k * graph_bytes if k < u - 1 else 0}
        step = (2 * c_local * d * 4                              # fp32 master leaf + its gradient
                + 3 * num_prefixes * n * c_local * 4)            # logits, softmax, their gradient
        refresh = rows_local * d * 4 if persistent["graph"] else 0   # IVF/Flat index: fp32 copy
        on_gpu = refresh if index_on_gpu else 0
        return {**persistent, "step_transient": step, "refresh_transient": refresh,
                "total": sum(persistent.values()) + max(step, on_gpu)}

    mem = shard(w)
    per_gpu = gpu_bytes - reserve_bytes
    per_row = d * (row_bytes + momentum_bytes + 4 * index_on_gpu) + (k * graph_bytes if k < u - 1 else 0)
    gpus = max(1, math.ceil(u * per_row / per_gpu)) if per_gpu > 0 else math.inf
    while per_gpu > 0 and shard(gpus)["total"] > per_gpu:
        gpus += 1
    ag, ar = (w - 1) / w, 2 * (w - 1) / w
    comm = {"allgather_embeddings": ag * n * d * emb_bytes, "allgather_labels": ag * n * 8,
            "allgather_batch_meta": ag * w * 6 * 8,
            "allreduce_neighbours": ar * n * k * graph_bytes if k < u - 1 else 0,
            "allreduce_max": ar * num_prefixes * n * 4, "allreduce_sumexp_target": ar * 2 * num_prefixes * n * 4,
            "reduce_scatter_embedding_grads": ag * n * d * emb_bytes}
    comm["per_step"] = sum(comm.values())
    # graph refresh: every rank receives every other shard once (row dtype) and sends candidates back
    refresh_bytes = ag * u * (d * row_bytes + (k + 1) * 16) if k < u - 1 else 0
    comm["refresh"] = refresh_bytes
    comm["refresh_per_step"] = refresh_bytes / refresh_steps if refresh_steps > 0 else 0.0
    flops = 6 * n * math.ceil(classes / w) * d * num_prefixes   # fwd + bwd matmuls, upper bound
    return {"num_classes": u, "dim": d, "world_size": w, "knn_k": k, "classes_scored_max": classes,
            "rows_per_shard": math.ceil(u / w), "bytes_per_shard": mem, "gpus_needed": gpus,
            "gpu_bytes": gpu_bytes, "comm_bytes": comm, "flops_per_step_per_shard": flops}


# --------------------------------------------------------------------------- the head
class ShardedPrototypeHead(nn.Module):
    """Tensor-parallel drop-in for ``margin_head.PrototypeHead`` (same constructor arguments first,
    same ``forward``, ``margin``, ``refresh_graph``, ``neighbours``, ``num_classes``, ``select``,
    ``sparse_sgd_step``); at world size 1 it computes the same loss, selection and update.

    ``centroids``: [U, D] array-like (numpy, ``np.memmap``, tensor); each rank reads only its own
    rows, so a memmap keeps a billion-row library off every rank's RAM. ``group``: the process group
    (default: WORLD if initialised, else world size 1). Every rank must call ``forward``,
    ``select``, ``refresh_graph``, ``neighbours``, ``sparse_sgd_step``, ``save_sharded`` and
    ``load_sharded`` together (they are collective).

    Extra keywords: ``knn_k`` fixes the neighbours per target (overrides ``knn_fraction``, which
    means ``ceil(fraction * U)``); ``row_dtype`` / ``momentum_dtype``; ``device`` for the rows (they
    also follow the embeddings' device at the first forward); ``graph_index`` (faiss factory
    string, default exact up to ``approx_above`` classes, IVF above) and ``graph_search`` (faiss
    search parameters); ``graph_gpu`` (faiss on the GPU: None = when available; False keeps the
    refresh's index, an fp32 copy of the shard, in host RAM); ``build_graph=False`` defers the
    first graph build.

    Row updates (``row_update``; what keeps the rows anchored to their members, issue #15): ``"sgd"``
    lazy momentum SGD from the loss gradient (with ``row_renorm`` the moved rows are put back on the
    unit sphere, so their norm cannot grow and shrink the effective step); ``"ema"`` each target row
    is re-centred on its members: ``row <- normalise(decay * row + (1 - decay) * mean of the step's
    normalised member embeddings)``, no gradient step (MoCo / memory-bank proxies); ``"frozen"``
    the rows stay the stage-2 centroids. Every forward reports ``row_member_cos`` (mean cosine of an
    embedding and its own row) and ``own_row_top1`` (share whose own row is the nearest scored row).
    """

    def __init__(self, centroids, dims: Sequence[int], weights: Sequence[float], margin: float,
                 temperature: float, knn_fraction: float = 0.1, refresh_steps: int = 50,
                 sampler: str = "knn", seed: int = 0, *, knn_k: int | None = None,
                 row_dtype: torch.dtype = torch.float32, momentum_dtype: torch.dtype = torch.float32,
                 group=None, device: torch.device | str | None = None, graph_index: str | None = None,
                 graph_search: str = "nprobe=16", approx_above: int = 50_000, graph_gpu: bool | None = None,
                 build_graph: bool = True, row_update: str = "sgd", row_renorm: bool = False,
                 ema_decay: float = 0.9):
        super().__init__()
        shape = tuple(getattr(centroids, "shape", ()))
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"centroids must be [U, D] with U, D >= 1, got {shape}")
        self.group, self.rank, self.world_size = _group_info(group)
        u, d = int(shape[0]), int(shape[1])
        if u < self.world_size:
            raise ValueError(f"{u} prototypes cannot be sharded over {self.world_size} ranks (U < world size)")
        if len(dims) != len(weights) or not dims:
            raise ValueError("dims and weights must be non-empty and of equal length")
        if min(dims) < 1 or max(dims) > d:
            raise ValueError(f"MRL dims {list(dims)} must lie in 1..{d} (the prototype width)")
        if sampler not in ("knn", "random"):
            raise ValueError(f"sampler must be 'knn' or 'random', got {sampler!r}")
        if knn_fraction <= 0:
            raise ValueError("knn_fraction must be > 0")
        if knn_k is not None and not 0 <= knn_k <= u - 1:
            raise ValueError(f"knn_k={knn_k} outside 0..{u - 1}")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if row_update not in ROW_UPDATES:
            raise ValueError(f"row_update must be one of {ROW_UPDATES}, got {row_update!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if row_dtype not in _ROW_DTYPES or momentum_dtype not in _ROW_DTYPES:
            raise ValueError(f"row_dtype and momentum_dtype must be one of {list(_ROW_DTYPES)}")
        self._num_classes, self.dim = u, d
        self.dims = [int(x) for x in dims]
        self.weights = [float(x) for x in weights]
        self.margin = float(margin)
        self.temperature = float(temperature)
        self.knn_fraction = float(knn_fraction)
        self.fixed_k = None if knn_k is None else int(knn_k)
        self.refresh_steps = int(refresh_steps)
        self.sampler, self.seed = sampler, int(seed)
        self.row_dtype, self.momentum_dtype = row_dtype, momentum_dtype
        self.row_update, self.row_renorm, self.ema_decay = row_update, bool(row_renorm), float(ema_decay)
        self.graph_search, self.approx_above, self.graph_gpu = graph_search, int(approx_above), graph_gpu
        self.graph_index = graph_index or default_graph_index(u, self.rows_per_rank, self.approx_above)
        self.step, self.num_refreshes = 0, 0
        self._generator = torch.Generator().manual_seed(self.seed)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_ema: list[tuple[Tensor, Tensor]] = []
        # a strided slice is a view (numpy, memmap, tensor): exactly one copy of this rank's rows is made
        block = centroids[self.rank::self.world_size]
        if not isinstance(block, Tensor):
            with warnings.catch_warnings():   # a read-only memmap: never written, copied just below
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                block = torch.from_numpy(np.asarray(block, dtype=np.float32))
        block = block.detach()
        # plain tensors, not Parameters / buffers: DDP must neither average nor broadcast them
        self.rows = block.to(device=device or block.device, dtype=row_dtype, copy=True).contiguous()
        self.momentum = torch.zeros_like(self.rows, dtype=momentum_dtype)
        self.graph = torch.zeros((self.rows_per_rank, 0), dtype=self._graph_dtype, device=self.rows.device)
        if build_graph:
            self.refresh_graph()

    # ----------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def rows_per_rank(self) -> int:
        return len(range(self.rank, self._num_classes, self.world_size))

    @property
    def knn_k(self) -> int:
        """Neighbours per target in the graph (U when every class is scored)."""
        return self.fixed_k if self.fixed_k is not None else knn_width(self._num_classes, self.knn_fraction)

    @property
    def _graph_dtype(self) -> torch.dtype:
        return torch.int32 if self._num_classes < 2**31 else torch.int64

    def _all_classes(self) -> bool:
        if self.fixed_k is None and self.knn_fraction >= 1.0:
            return True
        return self.knn_k >= self._num_classes - 1

    def local_ids(self) -> Tensor:
        """Global ids of this rank's rows (``rows[j]`` is prototype ``local_ids()[j]``)."""
        return shard_rows(self._num_classes, self.rank, self.world_size)

    def to_device(self, device) -> "ShardedPrototypeHead":
        """Move rows, momentum and graph (``Module.to`` does not: they are not parameters)."""
        self.rows, self.momentum, self.graph = (t.to(device) for t in (self.rows, self.momentum, self.graph))
        return self

    # ----------------------------------------------------------------- collectives
    def _comm_device(self) -> torch.device:
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if self.group is not None:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def _all_gather_uneven(self, t: Tensor, sizes: list[int]) -> list[Tensor]:
        """All-gather tensors whose first dimension differs by rank (padded to the largest)."""
        pad = torch.zeros((max(sizes) - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        out = t.new_empty((self.world_size * max(sizes), *t.shape[1:]))
        _all_gather_single(out, torch.cat([t, pad]), group=self.group)
        return [p[:s] for p, s in zip(out.chunk(self.world_size), sizes)]

    # ----------------------------------------------------------------- KNN graph
    @torch.no_grad()
    def _ring_knn(self, k: int, chunk: int = 1 << 15) -> Tensor:
        """[rows_per_rank, k] global ids of each local row's k nearest other rows, nearest first."""
        u, w, me = self._num_classes, self.world_size, self.rank
        search = "" if self.graph_index == "Flat" else self.graph_search   # exact: nothing to tune
        index = build_index(self.rows, self.graph_index, search, seed=self.seed,
                            use_gpu=self.graph_gpu if k + 1 <= _FAISS_GPU_MAX_K else False)
        my_ids = self.local_ids()
        out = torch.empty((self.rows_per_rank, k), dtype=self._graph_dtype)
        dev = self._comm_device()
        for src in range(w):
            n_src = len(range(src, u, w))
            for a in range(0, n_src, chunk):
                m = min(chunk, n_src - a)
                # sent in the row dtype (bf16 rows: half the bytes), normalised by the receivers
                q = self.rows[a:a + m].to(dev) if src == me else torch.empty((m, self.dim), dtype=self.row_dtype, device=dev)
                if self.group is not None:
                    dist.broadcast(q, dist.get_global_rank(self.group, src), group=self.group)
                score, idx = index.search(F.normalize(q.float(), dim=-1).cpu().numpy(), k + 1)
                score, idx = torch.from_numpy(score).double(), torch.from_numpy(idx)
                found = idx >= 0
                gid = torch.where(found, idx * w + me, -1)              # local index -> global id
                res = torch.cat([torch.where(found, score, -math.inf), gid.double()], dim=1).to(dev)
                if self.group is not None:
                    gather = [torch.empty_like(res) for _ in range(w)] if src == me else None
                    dist.gather(res, gather, dst=dist.get_global_rank(self.group, src), group=self.group)
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

    @torch.no_grad()
    def refresh_graph(self) -> None:
        """Rebuild this rank's rows of the prototype KNN graph from the current rows (collective)."""
        self.graph = None   # the old graph is not needed while the new one is built: save its memory
        if self._all_classes():
            graph = torch.zeros((self.rows_per_rank, 0), dtype=torch.int64)
        else:
            graph = self._ring_knn(self.knn_k)
        self.graph = graph.to(device=self.rows.device, dtype=self._graph_dtype)
        self.num_refreshes += 1

    def set_graph(self, graph: Tensor | np.ndarray) -> None:
        """Install this rank's rows of a graph built elsewhere (e.g. by an offline faiss job)."""
        graph = torch.as_tensor(graph)
        if graph.shape != (self.rows_per_rank, self.knn_k) or (
                graph.numel() and (int(graph.min()) < 0 or int(graph.max()) >= self._num_classes)):
            raise ValueError(f"graph must be [{self.rows_per_rank}, {self.knn_k}] ids in 0..{self._num_classes - 1}")
        self.graph = graph.to(device=self.rows.device, dtype=self._graph_dtype)

    def neighbours(self, k: int) -> np.ndarray:
        """[U, min(k, U-1)] nearest other prototypes of every prototype (nearest first), on every
        rank, for the similar-batch sampler. Holds U x k ids per rank: fine up to ~1e8 prototypes."""
        k = min(int(k), self._num_classes - 1)
        local = self._ring_knn(k).long() if k > 0 else torch.zeros((self.rows_per_rank, 0), dtype=torch.int64)
        full = torch.empty((self._num_classes, k), dtype=torch.int64)
        if self.group is None:
            full[:] = local
        else:
            sizes = [len(range(r, self._num_classes, self.world_size)) for r in range(self.world_size)]
            dev = self._comm_device()
            for r, part in enumerate(self._all_gather_uneven(local.to(dev), sizes)):
                full[r::self.world_size] = part.cpu()
        return full.numpy()

    # ----------------------------------------------------------------- selection
    def _check_batch(self, h: Tensor, labels: Tensor) -> list[int]:
        """Validate every rank's batch on every rank (one small all-gather), so that a bad batch
        raises the same ValueError everywhere instead of leaving the other ranks in a collective."""
        ok_shape = h.ndim == 2 and h.is_floating_point() and labels.numel() == h.shape[0]
        b = h.shape[0] if h.ndim >= 1 else 0
        width = h.shape[1] if h.ndim == 2 else -1
        lo = int(labels.min()) if labels.numel() else 0
        hi = int(labels.max()) if labels.numel() else 0
        meta = torch.tensor([b, width, int(ok_shape), lo, hi, labels.numel()], dtype=torch.int64)
        if self.group is not None:
            dev = self._comm_device()
            parts = [torch.empty(6, dtype=torch.int64, device=dev) for _ in range(self.world_size)]
            dist.all_gather(parts, meta.to(dev), group=self.group)
            metas = [p.cpu().tolist() for p in parts]
        else:
            metas = [meta.tolist()]
        for r, (b_r, width_r, ok, lo_r, hi_r, nl) in enumerate(metas):
            if not ok:
                raise ValueError(f"rank {r}: h must be a float [B, D] tensor with one label per row")
            if width_r != metas[0][1] or width_r < max(self.dims):
                raise ValueError(f"rank {r}: embedding width {width_r} (all ranks equal, >= {max(self.dims)})")
            if nl and (lo_r < 0 or hi_r >= self._num_classes):
                raise ValueError(f"rank {r}: labels outside 0..{self._num_classes - 1}")
        sizes = [m[0] for m in metas]
        if sum(sizes) == 0:
            raise ValueError("empty batch on every rank")
        return sizes

    def _select_global(self, labels: Tensor) -> Tensor:
        """Sorted unique class ids scored this step, identical on every rank; ``labels`` global."""
        dev = self.rows.device
        if self._all_classes():
            return torch.arange(self._num_classes, device=dev)
        if self.graph is None or self.graph.shape[1] != self.knn_k:
            raise RuntimeError("no KNN graph: call refresh_graph() or set_graph() first")
        labels = labels.to(dev)
        w = self.world_size
        mine = torch.nonzero(labels % w == self.rank).view(-1)
        nb = torch.zeros((labels.numel(), self.knn_k), dtype=self.graph.dtype, device=dev)
        nb[mine] = self.graph[labels[mine] // w]
        if self.group is not None:   # each target's row comes from its owner, zeros elsewhere
            nb = self._all_reduce(nb.to(self._comm_device())).to(dev)
        cls = torch.unique(torch.cat([labels, nb.view(-1).long()]), sorted=True)   # = knn_select
        if self.sampler == "knn":
            return cls
        if self._num_classes <= _RANDPERM_MAX:
            return random_select(labels, cls.numel(), self._num_classes, self._generator)
        return random_select_large(labels, cls.numel(), self._num_classes, self._generator)

    def select(self, labels: Tensor) -> Tensor:
        """Sorted unique class ids scored for the global batch ``labels`` (same on every rank)."""
        labels = labels.long().view(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self._num_classes):
            raise ValueError(f"labels outside 0..{self._num_classes - 1}")
        return self._select_global(labels)

    # ----------------------------------------------------------------- forward / update
    def forward(self, h: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        labels = labels.long().view(-1)
        sizes = self._check_batch(h, labels)
        if self.rows.device != h.device:
            self.to_device(h.device)
        if self.training:
            self.step += 1
            if self.refresh_steps > 0 and self.step % self.refresh_steps == 0:
                self.refresh_graph()
        w_, n = self.world_size, sum(sizes)
        if self.group is not None:
            padded = torch.cat([h, h.new_zeros((max(sizes) - h.shape[0], h.shape[1]))])
            parts = _AllGather.apply(padded, self.group, w_, float(w_)).chunk(w_)   # x W: see the docstring
            h_all = torch.cat([p[:s] for p, s in zip(parts, sizes)])
            y_all = torch.cat(self._all_gather_uneven(labels.to(self._comm_device()), sizes)).to(h.device)
        else:
            h_all, y_all = h, labels.to(h.device)
        cls = self._select_global(y_all)
        mine = cls[cls % w_ == self.rank]                           # sorted global ids scored here
        leaf = self.rows[mine // w_].float().requires_grad_()       # fp32 master of the touched rows
        if self.training and torch.is_grad_enabled():
            if len(self._pending) >= 1024:
                raise RuntimeError("call sparse_sgd_step() after each optimizer step")
            self._pending.append((mine // w_, leaf))
        owned = y_all % w_ == self.rank
        col = torch.where(owned, torch.searchsorted(mine, y_all), -1)
        c = mine.numel()
        # non-owned samples put their (discarded) margin on an extra zero row: arcface_logits stays
        # the single definition of the margin logit
        pos = torch.where(owned, col, c)
        w_ext = torch.cat([leaf, leaf.new_zeros((1, leaf.shape[1]))])
        with torch.autocast(h.device.type, enabled=False):        # the softmax needs fp32 logits
            hf = h_all.float()
            logits = torch.stack([arcface_logits(mrl_prefix(hf, d), mrl_prefix(w_ext, d), pos,
                                                 self.margin, self.temperature)[:, :c] for d in self.dims])
            losses = _DistCrossEntropy.apply(logits, col, self.group, n)
        total: Tensor | None = None
        stats: dict = {"classes_scored": int(cls.numel()), "classes_local": int(c),
                       **self._anchor_stats(hf, leaf, owned, col, logits[self.dims.index(max(self.dims))], n)}
        if self.training and torch.is_grad_enabled() and self.row_update == "ema":
            self._stash_ema(hf.detach(), y_all, owned)
        for i, (dim, wk) in enumerate(zip(self.dims, self.weights)):
            stats[f"loss_d{dim}"] = float(losses[i].detach())
            total = wk * losses[i] if total is None else total + wk * losses[i]
        assert total is not None
        return total, stats

    @torch.no_grad()
    def _anchor_stats(self, hf: Tensor, leaf: Tensor, owned: Tensor, col: Tensor, logits: Tensor,
                      n: int) -> dict:
        """row_member_cos and own_row_top1 over the global batch (full width, no margin; collective)."""
        d = max(self.dims)
        own = torch.zeros(n, dtype=torch.float64, device=hf.device)
        if bool(owned.any()):
            own[owned] = F.cosine_similarity(hf[owned, :d], leaf[col[owned], :d].detach(), dim=-1).double()
        other = logits.detach().double() * self.temperature            # cosines (the margin is on the target only)
        if owned.any() and other.shape[1]:
            other[owned.nonzero().view(-1), col[owned]] = -math.inf
        best = other.max(dim=1).values if other.shape[1] else torch.full((n,), -math.inf, dtype=torch.float64,
                                                                         device=hf.device)
        if self.group is not None:
            own = self._all_reduce(own.to(self._comm_device())).to(hf.device)
            best = self._all_reduce(best.to(self._comm_device()), dist.ReduceOp.MAX).to(hf.device)
        return {"row_member_cos": float(own.mean()), "own_row_top1": float((own > best).double().mean())}

    def _stash_ema(self, hf: Tensor, labels: Tensor, owned: Tensor) -> None:
        """The mean normalised embedding of each owned target's members this step, for the EMA."""
        y = labels[owned]
        if not y.numel():
            return
        uniq, inv = torch.unique(y, return_inverse=True)
        sums = torch.zeros((uniq.numel(), hf.shape[1]), dtype=torch.float32, device=hf.device)
        sums.index_add_(0, inv, F.normalize(hf[owned], dim=-1))
        self._pending_ema.append((uniq // self.world_size, F.normalize(sums, dim=-1)))

    @torch.no_grad()
    def _write_rows(self, idx: Tensor, new: Tensor) -> None:
        if self.row_renorm or self.row_update == "ema":
            new = F.normalize(new, dim=-1)
        if self.row_dtype != torch.float32:
            gid = idx * self.world_size + self.rank
            new = stochastic_round(new, self.row_dtype, hash_uniform(gid, self.dim, self.step, self.seed))
        self.rows[idx] = new.to(self.row_dtype)

    @torch.no_grad()
    def sparse_sgd_step(self, lr: float, momentum: float = 0.9) -> int:
        """Update the rows touched since the last call, as ``row_update`` says: lazy momentum SGD (as
        ``PrototypeHead.sparse_sgd_step``) from their gradient, summed over gradient-accumulation
        forwards; or the members' moving average; or nothing. Returns how many rows moved on all
        ranks together (collective)."""
        pending, self._pending = self._pending, []
        ema, self._pending_ema = self._pending_ema, []
        got = [(i, leaf.grad) for i, leaf in pending if leaf.grad is not None] if self.row_update == "sgd" else []
        moved = 0
        for idx, mean in ema:
            rows = F.normalize(self.rows[idx].float(), dim=-1)
            self._write_rows(idx, self.ema_decay * rows + (1.0 - self.ema_decay) * mean)
            moved += int(idx.numel())
        if got:
            idx, g = torch.cat([i for i, _ in got]), torch.cat([gr for _, gr in got])
            if len(got) > 1:
                idx, inv = torch.unique(idx, return_inverse=True)
                g = torch.zeros((idx.numel(), g.shape[1]), dtype=g.dtype, device=g.device).index_add_(0, inv, g)
            nz = g.abs().sum(dim=1) != 0
            idx, g = idx[nz], g[nz]
            v = self.momentum[idx].float().mul_(momentum).add_(g)
            self.momentum[idx] = v.to(self.momentum_dtype)
            self._write_rows(idx, self.rows[idx].float() - lr * v)
            moved = int(idx.numel())
        if self.group is None:
            return moved
        return int(self._all_reduce(torch.tensor([moved], device=self._comm_device())).item())

    # ----------------------------------------------------------------- re-sharding and checkpoints
    @torch.no_grad()
    def shard(self, group=None) -> "ShardedPrototypeHead":
        """Split a head built at world size 1 (before the process group existed, identically on
        every process: same centroids, same seed) onto ``group``; e.g. in LightningModule.setup()."""
        new_group, rank, world = _group_info(group)
        if world == self.world_size and new_group is self.group:
            return self
        if self.world_size != 1:
            raise ValueError("shard() re-shards a world-size-1 head; use save_sharded/load_sharded otherwise")
        if self._num_classes < world:
            raise ValueError(f"{self._num_classes} prototypes cannot be sharded over {world} ranks")
        self.group, self.rank, self.world_size = new_group, rank, world
        self.rows, self.momentum, self.graph = (t[rank::world].clone() for t in (self.rows, self.momentum, self.graph))
        self._pending, self._pending_ema = [], []
        return self

    def save_sharded(self, directory: str | Path) -> None:
        """Write ``rank{r:05d}.pt`` per rank and ``meta.json`` (collective; meta is written last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"rows": self.rows.cpu(), "momentum": self.momentum.cpu(), "graph": self.graph.cpu(),
                 "step": self.step, "num_refreshes": self.num_refreshes, "knn_k": self.graph.shape[1],
                 "generator": self._generator.get_state(), "margin": self.margin}
        tmp = directory / f".rank{self.rank:05d}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, directory / f"rank{self.rank:05d}.pt")
        if self.group is not None:
            dist.barrier(group=self.group)
        if self.rank == 0:
            meta = {"format": "sharded_prototype_head/1", "layout": "strided", "num_classes": self._num_classes,
                    "dim": self.dim, "world_size": self.world_size, "row_dtype": str(self.row_dtype),
                    "momentum_dtype": str(self.momentum_dtype), "step": self.step}
            (directory / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
            os.replace(directory / "meta.json.tmp", directory / "meta.json")
        if self.group is not None:
            dist.barrier(group=self.group)

    @torch.no_grad()
    def load_sharded(self, directory: str | Path) -> None:
        """Load a ``save_sharded`` checkpoint written at any world size; each rank memory-maps the
        files and reads only its own rows (row i was saved by rank i % W_saved at i // W_saved)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{directory} is not a complete sharded checkpoint (no meta.json)")
        meta = json.loads(meta_path.read_text())
        if (meta["num_classes"], meta["dim"]) != (self._num_classes, self.dim):
            raise ValueError(f"checkpoint has U={meta['num_classes']}, D={meta['dim']}; this head "
                             f"U={self._num_classes}, D={self.dim}")
        ws = int(meta["world_size"])
        ids = self.local_ids()
        rows = torch.empty((ids.numel(), self.dim), dtype=self.row_dtype)
        mom = torch.empty((ids.numel(), self.dim), dtype=self.momentum_dtype)
        graph, scalars = None, None
        for s in range(ws):
            here = torch.nonzero(ids % ws == s).view(-1)
            if here.numel() == 0 and scalars is not None:
                continue
            st = torch.load(directory / f"rank{s:05d}.pt", mmap=True, weights_only=True)
            scalars = scalars or st
            if graph is None:
                graph = torch.empty((ids.numel(), st["knn_k"]), dtype=self._graph_dtype)
            src = ids[here] // ws
            rows[here] = st["rows"][src].to(self.row_dtype)
            mom[here] = st["momentum"][src].to(self.momentum_dtype)
            graph[here] = st["graph"][src].to(self._graph_dtype)
        dev = self.rows.device
        self.rows, self.momentum = rows.to(dev), mom.to(dev)
        self.step, self.num_refreshes = int(scalars["step"]), int(scalars["num_refreshes"])
        self.margin = float(scalars["margin"])
        self._generator.set_state(scalars["generator"])
        self._pending, self._pending_ema = [], []
        if graph.shape[1] == (0 if self._all_classes() else self.knn_k):
            self.graph = graph.to(dev)
        else:   # saved with another k: rebuild from the loaded rows
            self.refresh_graph()
            self.num_refreshes = int(scalars["num_refreshes"])
