"""torch.distributed pieces of the sharded prototype head (training/head/sharded.py).

The strided row layout (global row ``i`` lives on rank ``i % W`` at local index ``i // W``), the
process-group lookup, the small collectives the head and the KNN ring share (including
``check_batches``, which validates every rank's batch on every rank), and the two autograd
functions that make the tensor-parallel loss exact: ``AllGather`` (all-gather forward,
reduce-scatter backward) and ``DistCrossEntropy`` (softmax cross-entropy with the classes split
across ranks). Kept apart from the head so that the graph builder (training/head/knn_graph.py) uses
the same layout and collectives without importing the head. Every function is a no-op collective at
world size 1 (``group`` None).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 names (the *_tensor spellings are deprecated there)
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- layout and groups
def shard_rows(num_rows: int, rank: int, world_size: int) -> Tensor:
    """Global ids of the rows owned by ``rank``: ``rank, rank + W, rank + 2W, ...``."""
    return torch.arange(rank, num_rows, world_size)


def group_info(group) -> tuple[object, int, int]:
    """(group, rank, world size): WORLD when initialised and ``group`` is None, else (None, 0, 1)."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where tensors handed to ``group``'s collectives must live (the current GPU for NCCL)."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of ``t`` over ``group`` (unchanged at world size 1); returns ``t``."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_uneven(t: Tensor, sizes: list[int], group) -> list[Tensor]:
    """All-gather tensors whose first dimension differs by rank (``sizes``; padded to the largest)."""
    world = len(sizes)
    pad = torch.zeros((max(sizes) - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    out = t.new_empty((world * max(sizes), *t.shape[1:]))
    all_gather_single(out, torch.cat([t, pad]), group=group)
    return [p[:s] for p, s in zip(out.chunk(world), sizes)]


def check_batches(h: Tensor, labels: Tensor, group, world_size: int, min_width: int, num_classes: int) -> list[int]:
    """Validate every rank's batch on every rank (one small all-gather), so that a bad batch
    raises the same ValueError everywhere instead of leaving the other ranks in a collective.
    Returns the local batch sizes of all ranks."""
    ok_shape = h.ndim == 2 and h.is_floating_point() and labels.numel() == h.shape[0]
    b = h.shape[0] if h.ndim >= 1 else 0
    width = h.shape[1] if h.ndim == 2 else -1
    lo = int(labels.min()) if labels.numel() else 0
    hi = int(labels.max()) if labels.numel() else 0
    meta = torch.tensor([b, width, int(ok_shape), lo, hi, labels.numel()], dtype=torch.int64)
    if group is not None:
        dev = comm_device(group)
        parts = [torch.empty(6, dtype=torch.int64, device=dev) for _ in range(world_size)]
        dist.all_gather(parts, meta.to(dev), group=group)
        metas = [p.cpu().tolist() for p in parts]
    else:
        metas = [meta.tolist()]
    for r, (b_r, width_r, ok, lo_r, hi_r, nl) in enumerate(metas):
        if not ok:
            raise ValueError(f"rank {r}: h must be a float [B, D] tensor with one label per row")
        if width_r != metas[0][1] or width_r < min_width:
            raise ValueError(f"rank {r}: embedding width {width_r} (all ranks equal, >= {min_width})")
        if nl and (lo_r < 0 or hi_r >= num_classes):
            raise ValueError(f"rank {r}: labels outside 0..{num_classes - 1}")
    sizes = [m[0] for m in metas]
    if sum(sizes) == 0:
        raise ValueError("empty batch on every rank")
    return sizes


# --------------------------------------------------------------------------- autograd pieces
class AllGather(torch.autograd.Function):
    """All-gather along dim 0 (same shape on every rank). Backward: reduce-scatter, i.e. each rank
    gets the sum over ranks of the gradient of its own slice, times ``scale`` (= W, because DDP
    averages the backbone gradients over ranks while the global loss needs their sum)."""

    @staticmethod
    def forward(ctx, x, group, world, scale):
        ctx.group, ctx.world, ctx.scale = group, world, scale
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty((g.shape[0] // ctx.world, *g.shape[1:]))
        reduce_scatter_single(gx, g.contiguous(), group=ctx.group)
        return gx * ctx.scale, None, None, None


class DistCrossEntropy(torch.autograd.Function):
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
