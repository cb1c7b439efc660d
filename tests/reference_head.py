"""The single-process reference prototype head the tests check ShardedPrototypeHead against.

``PrototypeHead`` is the straightforward version of the stage-3 ID head (PAPER.md "Embedding"): a
single U x D linear layer whose rows start at the stage-2 prototype centroids. Instead of scoring
all U prototypes, each step scores the targets plus, per target, its nearest ``ceil(knn_fraction * U)``
prototypes in a prototype-to-prototype KNN graph ("KNN sparse similarity"); the graph is rebuilt
from the current rows every ``refresh_steps`` training steps ("dynamic proxy update"). A
``"random"`` sampler (Partial-FC style, same number of classes) is the ablation.

Not production code (training uses training.head.ShardedPrototypeHead, which at world size 1
computes the same loss, selection and update: tests/test_sharded_head.py). It shares the graph
builder, ``knn_width`` and ``random_select`` with the sharded head; ``forward`` only gathers
``weight[cls]``, so only the selected rows receive gradient (the basis of a sparse update).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from training.head.knn_graph import knn_graph, knn_width
from training.head.sharded import random_select
from training.losses import margin_loss, mrl_prefix


def knn_select(targets: Tensor, graph: Tensor) -> Tensor:
    """Sorted unique union of ``targets`` and their rows of the KNN ``graph`` [U, k]."""
    targets = targets.to(graph.device).long().view(-1)
    return torch.unique(torch.cat([targets, graph[targets].reshape(-1)]), sorted=True)


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
