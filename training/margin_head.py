"""Stage-3 prototype head: ID recognition with an additive angular margin (PAPER.md "Embedding").

A single U x D linear layer whose rows start at the stage-2 prototype centroids. Instead of scoring
all U prototypes, each step scores the targets plus, per target, its nearest ``ceil(knn_fraction * U)``
prototypes in a prototype-to-prototype KNN graph ("KNN sparse similarity"); the graph is rebuilt
from the current rows every ``refresh_steps`` training steps ("dynamic proxy update"). A
``"random"`` sampler (Partial-FC style, same number of classes) is the ablation.

Single process. The selection logic lives in the module-level functions ``knn_graph``,
``knn_select``, ``knn_select_count`` and ``random_select`` so that a sharded (tensor-parallel) head
can reuse it unchanged; ``PrototypeHead.forward`` only gathers ``weight[cls]``, so only the selected
rows receive gradient (the basis of a sparse update).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np
import torch
from torch import Tensor, nn

from training.losses import margin_loss, mrl_prefix

# faiss GPU brute-force search supports k up to this many results (CPU beyond it).
_FAISS_GPU_MAX_K = 2048

_gpu_resources = None


def _faiss_gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _gpu_res():
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def knn_graph(rows: np.ndarray | Tensor, k: int, use_gpu: bool | None = None) -> np.ndarray:
    """[U, k] int64: for each row, its k nearest *other* rows by cosine similarity, nearest first.

    Built with faiss ``IndexFlatIP`` on the L2-normalised rows (faiss GPU when available and
    k + 1 is within the GPU search limit). The row itself is removed from its own list, even when
    duplicates tie with it.
    """
    if isinstance(rows, Tensor):
        rows = rows.detach().float().cpu().numpy()
    x = np.ascontiguousarray(rows, dtype=np.float32)
    u, dim = x.shape
    if not 0 <= k <= u - 1:
        raise ValueError(f"k={k} outside 0..{u - 1} for {u} rows")
    if k == 0:
        return np.zeros((u, 0), dtype=np.int64)
    x = x.copy()
    faiss.normalize_L2(x)
    kk = k + 1
    if use_gpu is None:
        use_gpu = _faiss_gpu_available()
    index = faiss.IndexFlatIP(dim)
    if use_gpu and kk <= _FAISS_GPU_MAX_K:
        index = faiss.index_cpu_to_gpu(_gpu_res(), 0, index)
    index.add(x)
    _, idx = index.search(x, kk)                               # [U, k + 1], self normally first
    is_self = idx == np.arange(u)[:, None]
    # Stable sort: non-self entries keep their order; a row whose self was not returned drops its last.
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :k].astype(np.int64)


def knn_width(num_classes: int, fraction: float) -> int:
    """Negatives per target: ``ceil(fraction * U)``, at most U - 1 (U when fraction >= 1: all)."""
    if fraction >= 1.0:
        return num_classes
    return min(max(math.ceil(fraction * num_classes), 0), num_classes - 1)


def knn_select(targets: Tensor, graph: Tensor) -> Tensor:
    """Sorted unique union of ``targets`` and their rows of the KNN ``graph`` [U, k]."""
    targets = targets.to(graph.device).long().view(-1)
    return torch.unique(torch.cat([targets, graph[targets].reshape(-1)]), sorted=True)


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


class PrototypeHead(nn.Module):
    """U-way additive-angular-margin classifier over a prototype library, on every MRL prefix.

    ``forward(h, labels)`` (labels: prototype ids in 0..U-1) returns
    ``(sum_k w_k * margin_loss(prefix_k(h), prefix_k(weight[cls]), pos, margin, temperature), stats)``
    where ``cls = select(labels)`` and ``pos`` are the labels' positions in ``cls``.
    """

    def __init__(self, centroids: Tensor | np.ndarray, dims: Sequence[int], weights: Sequence[float],
                 margin: float, temperature: float, knn_fraction: float = 0.1, refresh_steps: int = 50,
                 sampler: str = "knn", seed: int = 0):
        super().__init__()
        init = torch.as_tensor(np.asarray(centroids) if not isinstance(centroids, Tensor) else centroids)
        init = init.detach().clone().float()
        if init.ndim != 2 or init.shape[0] < 1:
            raise ValueError(f"centroids must be [U, D], got {tuple(init.shape)}")
        if len(dims) != len(weights) or not dims:
            raise ValueError("dims and weights must be non-empty and of equal length")
        if max(dims) > init.shape[1]:
            raise ValueError(f"MRL dim {max(dims)} exceeds the prototype width {init.shape[1]}")
        if sampler not in ("knn", "random"):
            raise ValueError(f"sampler must be 'knn' or 'random', got {sampler!r}")
        if knn_fraction <= 0:
            raise ValueError("knn_fraction must be > 0")
        self.weight = nn.Parameter(init)
        self.dims = [int(x) for x in dims]
        self.weights = [float(x) for x in weights]
        self.margin = float(margin)
        self.temperature = float(temperature)
        self.knn_fraction = float(knn_fraction)
        self.refresh_steps = int(refresh_steps)
        self.sampler = sampler
        self.seed = int(seed)
        self.num_refreshes = 0
        self._generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("velocity", torch.zeros_like(init))   # momentum of sparse_sgd_step
        self.register_buffer("graph", torch.zeros((0, 0), dtype=torch.long), persistent=False)
        self.refresh_graph()
        # a loaded checkpoint moves the rows: rebuild the graph from them
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_graph())

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def knn_k(self) -> int:
        """Neighbours per target in the graph (U when every class is scored)."""
        return knn_width(self.num_classes, self.knn_fraction)

    def _all_classes(self) -> bool:
        return self.knn_fraction >= 1.0 or self.knn_k >= self.num_classes - 1

    @torch.no_grad()
    def refresh_graph(self) -> None:
        """Rebuild the prototype KNN graph from the current rows (faiss, GPU when available)."""
        if self._all_classes():
            graph = torch.zeros((self.num_classes, 0), dtype=torch.long)
        else:
            graph = torch.from_numpy(knn_graph(self.weight, self.knn_k))
        self.graph = graph.to(self.weight.device)
        self.num_refreshes += 1

    def neighbours(self, k: int) -> np.ndarray:
        """[U, min(k, U-1)] nearest other prototypes (current rows, nearest first), for the
        similar-batch sampler."""
        return knn_graph(self.weight, min(k, self.num_classes - 1))

    def _check_labels(self, labels: Tensor) -> Tensor:
        labels = labels.long().view(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels outside 0..{self.num_classes - 1}")
        return labels

    def select(self, labels: Tensor) -> Tensor:
        """Sorted unique class ids scored this step (targets always included)."""
        labels = self._check_labels(labels).to(self.weight.device)
        if self._all_classes():
            return torch.arange(self.num_classes, device=self.weight.device)
        cls = knn_select(labels, self.graph)
        if self.sampler == "knn":
            return cls
        return random_select(labels, cls.numel(), self.num_classes, self._generator)

    @torch.no_grad()
    def sparse_sgd_step(self, lr: float, momentum: float = 0.9) -> int:
        """Momentum SGD on the rows that got a gradient this step; returns how many moved.

        The rows have their own optimizer because Adam is wrong for them: it scales every element's
        step to about ``lr`` however small its gradient, so the thousands of rows that are only
        scored as far-away negatives (softmax weight ~1e-4) would all jump by a full step each
        iteration and drift off the data. Momentum is lazy: an untouched row neither moves nor
        decays its velocity. The gradient is consumed (set to None)."""
        g = self.weight.grad
        if g is None:
            return 0
        rows = torch.nonzero(g.abs().sum(dim=1)).view(-1)
        v = self.velocity[rows].mul_(momentum).add_(g[rows])
        self.velocity[rows] = v
        self.weight[rows] -= lr * v
        self.weight.grad = None
        return int(rows.numel())

    def forward(self, h: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        if self.training:
            self.step += 1
            if self.refresh_steps > 0 and int(self.step) % self.refresh_steps == 0:
                self.refresh_graph()
        labels = self._check_labels(labels).to(self.weight.device)
        cls = self.select(labels)
        pos = torch.searchsorted(cls, labels)                  # label -> its column among cls
        w = self.weight[cls]                                   # gather: only these rows get gradient
        h = h.to(self.weight.device)
        total: Tensor | None = None
        stats: dict = {"classes_scored": int(cls.numel())}
        for dim, wk in zip(self.dims, self.weights):
            loss = margin_loss(mrl_prefix(h, dim), mrl_prefix(w, dim), pos, self.margin, self.temperature)
            stats[f"loss_d{dim}"] = float(loss.detach())
            total = wk * loss if total is None else total + wk * loss
        assert total is not None
        return total, stats
