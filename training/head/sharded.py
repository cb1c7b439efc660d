"""ShardedPrototypeHead: the stage-3 ID-prototype margin head, tensor parallel for a billion-scale
library (PAPER.md "Scale"; GitHub issue #4), and the class sampling only it needs. Its collectives,
KNN graph, row storage / checkpoints and cost model are the sibling modules of training/head/.

The backbone is data parallel (DDP); the U prototype rows are sharded across the same ranks
(style of insightface ``partial_fc_v2``). One step, for a global batch of N = sum of the local
batches:

1. The embeddings and labels are all-gathered (``AllGather``: ``all_gather_single`` forward,
   ``reduce_scatter_single`` backward, so gradients flow back to every rank's backbone output).
2. Every rank selects the same scored set ``cls``: the targets plus the union of their rows of the
   prototype KNN graph (each rank keeps the graph rows of its own prototypes; the owners' rows are
   combined by one integer all-reduce), or the same number of uniform random classes from an RNG
   that is identical on every rank.
3. Each rank scores only its own selected rows: logits ``[P prefixes, N, C_local]``, the margin on
   the target column done by ``training.losses.arcface_logits`` on the owning rank. The softmax is
   distributed (``DistCrossEntropy``): all-reduce MAX of the row maxima, one all-reduce SUM of
   (sum of exponentials, target logit). No rank ever holds the full [N, U] (or [N, C]) logits.

Layout: strided. Global row ``i`` lives on rank ``i % W`` at local index ``i // W``. Prototype ids
handed out by curation are grouped by category and a target's neighbours are usually in its own
category, so a contiguous split would put most of a step's scored rows (and its compute) on one
rank; striding spreads every id range over all ranks. Re-sharding to another world size is an
index computation (``load_sharded``).

Gradient scaling (why the backbone gradient is exact under DDP): each rank's loss value is the
global-batch loss ``L = (1/N) sum_i CE_i`` (identical on all ranks), and ``DistCrossEntropy``'s
backward returns the exact ``dL/dlogits`` for the local columns. So each rank's rows get exactly
``dL/dw`` (no averaging: the rows are not DDP parameters), and the gathered embeddings get each
rank's share of ``dL/dh``; the all-gather's backward sums the shares over ranks, giving rank r the
full ``dL/dh_r`` for its own samples. DDP then *averages* backbone gradients over W ranks, while
the reference gradient on the concatenated batch is their *sum*; hence the local embeddings'
gradient is multiplied by W (in ``AllGather``'s backward) and ``h.grad == W * dL/dh_r``. After
DDP's average the backbone gradient equals the single-process one on the global batch
(tests/test_sharded_head.py).

The rows are *not* an ``nn.Parameter`` or a registered buffer (DDP must neither average nor
broadcast them): they are plain tensors. Each forward gathers a fp32 leaf
``w = rows[local_cls].float().requires_grad_()``; ``sparse_sgd_step`` applies lazy momentum SGD
from ``w.grad`` to exactly those rows (sparse by construction; gradient accumulation over several
forwards is summed like a ``.grad``).

Dtypes: rows in ``row_dtype`` (fp32, or bf16/fp16 to halve memory). The fp32 master copy exists
only for the touched rows during a step; low-precision rows are written back with stochastic
rounding (training/head/storage.py). The momentum buffer is ``momentum_dtype`` (fp32 by default;
bf16 halves it again, rounded to nearest). The KNN graph (training/head/knn_graph.py, rebuilt every
``refresh_steps`` steps) is int32 [U/W, k] (int64 only if U >= 2**31). Checkpoints:
``save_sharded`` / ``load_sharded`` (training/head/storage.py), readable at any world size.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from training.head.collectives import (AllGather, DistCrossEntropy, all_gather_uneven, all_reduce, check_batches,
                                       comm_device, group_info, shard_rows)
from training.head.knn_graph import default_graph_index, graph_dtype, knn_width, ring_knn
from training.head.storage import ShardedCheckpoint, hash_uniform, stochastic_round
from training.losses import arcface_logits, mrl_prefix

_ROW_DTYPES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
ROW_UPDATES = ("sgd", "ema", "frozen")
_RANDPERM_MAX = 1 << 16   # up to here the random sampler is random_select (exact parity with the reference head)


# --------------------------------------------------------------------------- class sampling
def random_select(targets: Tensor, total: int, num_classes: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Sorted unique targets plus uniform random other classes, ``total`` classes in all (Partial-FC)."""
    device = targets.device
    targets = torch.unique(targets.long().view(-1), sorted=True)
    extra = total - targets.numel()
    if extra <= 0:
        return targets
    is_target = torch.zeros(num_classes, dtype=torch.bool)
    is_target[targets.cpu()] = True
    others = torch.nonzero(~is_target).view(-1)
    pick = others[torch.randperm(others.numel(), generator=generator)[:extra]]
    return torch.unique(torch.cat([targets, pick.to(device)]), sorted=True)


def random_select_large(targets: Tensor, total: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Like ``random_select`` (sorted unique targets plus uniform random other classes,
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


# --------------------------------------------------------------------------- the head
class ShardedPrototypeHead(ShardedCheckpoint, nn.Module):
    """Tensor-parallel drop-in for the single-process reference ``PrototypeHead``
    (tests/reference_head.py; same constructor arguments first, same ``forward``, ``margin``,
    ``refresh_graph``, ``neighbours``, ``num_classes``, ``select``, ``sparse_sgd_step``); at world
    size 1 it computes the same loss, selection and update.

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
        self.group, self.rank, self.world_size = group_info(group)
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
        return graph_dtype(self._num_classes)

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

    # ----------------------------------------------------------------- KNN graph
    def _ring_knn(self, k: int) -> Tensor:
        """[rows_per_rank, k] global ids of each local row's k nearest other rows, nearest first."""
        return ring_knn(self.rows, k, self._num_classes, spec=self.graph_index, search_params=self.graph_search,
                        seed=self.seed, use_gpu=self.graph_gpu, group=self.group, rank=self.rank,
                        world_size=self.world_size)

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
            dev = comm_device(self.group)
            for r, part in enumerate(all_gather_uneven(local.to(dev), sizes, self.group)):
                full[r::self.world_size] = part.cpu()
        return full.numpy()

    # ----------------------------------------------------------------- selection
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
            nb = all_reduce(nb.to(comm_device(self.group)), self.group).to(dev)
        cls = torch.unique(torch.cat([labels, nb.view(-1).long()]), sorted=True)   # = the reference's knn_select
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
        sizes = check_batches(h, labels, self.group, self.world_size, max(self.dims), self._num_classes)
        if self.rows.device != h.device:
            self.to_device(h.device)
        if self.training:
            self.step += 1
            if self.refresh_steps > 0 and self.step % self.refresh_steps == 0:
                self.refresh_graph()
        w_, n = self.world_size, sum(sizes)
        if self.group is not None:
            padded = torch.cat([h, h.new_zeros((max(sizes) - h.shape[0], h.shape[1]))])
            parts = AllGather.apply(padded, self.group, w_, float(w_)).chunk(w_)   # x W: see the docstring
            h_all = torch.cat([p[:s] for p, s in zip(parts, sizes)])
            y_all = torch.cat(all_gather_uneven(labels.to(comm_device(self.group)), sizes, self.group)).to(h.device)
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
            losses = DistCrossEntropy.apply(logits, col, self.group, n)
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
            own = all_reduce(own.to(comm_device(self.group)), self.group).to(hf.device)
            best = all_reduce(best.to(comm_device(self.group)), self.group, dist.ReduceOp.MAX).to(hf.device)
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
        return int(all_reduce(torch.tensor([moved], device=comm_device(self.group)), self.group).item())
