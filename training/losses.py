"""Losses for the Pailitao-VL embedding (PAPER.md "Embedding", stages 1 and 3).

Pure torch functions, no module state:

- ``mrl_prefix``: a Matryoshka prefix of an embedding, re-normalised.
- ``info_nce`` / ``info_nce_mrl``: stage-1 contrastive loss (in-batch + mined hard negatives),
  applied on every MRL prefix with its own weight and temperature.
- ``arcface_logits`` / ``margin_loss``: stage-3 ID recognition with an additive angular margin
  (the target logit is cos(theta_y + m) / tau, the others cos(theta_j) / tau).

Logits are computed in (at least) float32 so that bf16 activations do not lose the softmax.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# acos is clamped to [-1 + eps, 1 - eps]: d/dx acos(x) = -1/sqrt(1 - x^2) stays finite (~700 in fp32).
ACOS_EPS = 1e-6


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mrl_prefix(emb: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates of ``emb`` (last axis), L2-normalised."""
    if dim <= 0 or dim > emb.shape[-1]:
        raise ValueError(f"MRL prefix {dim} outside 1..{emb.shape[-1]}")
    return F.normalize(emb[..., :dim], dim=-1)


def info_nce(q: Tensor, d: Tensor, temperature: float, hard_negatives: Tensor | None = None,
             labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between a query view ``q`` [B, D] and its positive view ``d`` [B, D].

    Both are expected L2-normalised (they are not re-normalised here). Row i's positive is column i.

    - q -> d: logits ``q @ d.T / t``; ``hard_negatives`` [B, H, D] (row i's mined negatives, normalised)
      add H extra columns to row i: ``<q_i, hard_{i,h}> / t``.
    - d -> q: logits ``d @ q.T / t`` (in-batch only, hard negatives belong to the query side).
    - ``labels`` [B] (instance ids): an in-batch column j != i with ``labels[j] == labels[i]`` is the
      same instance, so it is masked out of row i's softmax (in both directions) instead of being
      pushed away as a negative.

    Returns the mean over rows of the two directions, averaged: ``(L_qd + L_dq) / 2``.
    """
    if q.ndim != 2 or q.shape != d.shape:
        raise ValueError(f"q and d must both be [B, D], got {tuple(q.shape)} and {tuple(d.shape)}")
    q, d = _at_least_fp32(q), _at_least_fp32(d.to(q.dtype))
    b = q.shape[0]
    sim = q @ d.T / temperature                               # [B, B], sim[i, j] = <q_i, d_j> / t
    if labels is not None:
        labels = labels.to(q.device).view(-1)
        if labels.shape[0] != b:
            raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {b}")
        eye = torch.eye(b, dtype=torch.bool, device=q.device)
        same = (labels[:, None] == labels[None, :]) & ~eye    # symmetric
        sim = sim.masked_fill(same, float("-inf"))
    target = torch.arange(b, device=q.device)
    logits_qd = sim
    if hard_negatives is not None:
        if hard_negatives.ndim != 3 or hard_negatives.shape[0] != b or hard_negatives.shape[2] != q.shape[1]:
            raise ValueError(f"hard_negatives must be [B, H, D], got {tuple(hard_negatives.shape)}")
        hn = hard_negatives.to(q.dtype)
        hard = torch.einsum("bd,bhd->bh", q, hn) / temperature  # [B, H]
        logits_qd = torch.cat([sim, hard], dim=1)
    loss_qd = F.cross_entropy(logits_qd, target)
    loss_dq = F.cross_entropy(sim.T, target)                  # sim.T[i, j] = <d_i, q_j> / t
    return 0.5 * (loss_qd + loss_dq)


def info_nce_mrl(q: Tensor, d: Tensor, dims: Sequence[int], weights: Sequence[float],
                 temperatures: Sequence[float], hard_negatives: Tensor | None = None,
                 labels: Tensor | None = None) -> tuple[Tensor, dict[int, float]]:
    """Matryoshka InfoNCE: ``sum_k w_k * info_nce(prefix_k(q), prefix_k(d), t_k, prefix_k(hard))``.

    Every prefix is re-normalised (``mrl_prefix``). Returns the weighted loss and the unweighted
    per-prefix loss values ``{dim: float}`` (detached, for logging).
    """
    if not (len(dims) == len(weights) == len(temperatures)) or not dims:
        raise ValueError("dims, weights and temperatures must be non-empty and of equal length")
    total: Tensor | None = None
    parts: dict[int, float] = {}
    for dim, w, t in zip(dims, weights, temperatures):
        hn = mrl_prefix(hard_negatives, dim) if hard_negatives is not None else None
        loss = info_nce(mrl_prefix(q, dim), mrl_prefix(d, dim), t, hn, labels)
        parts[int(dim)] = float(loss.detach())
        total = w * loss if total is None else total + w * loss
    assert total is not None
    return total, parts


def arcface_logits(h: Tensor, w: Tensor, labels: Tensor, margin: float, temperature: float) -> Tensor:
    """Additive-angular-margin logits [B, C].

    ``h`` [B, D] and the class rows ``w`` [C, D] are L2-normalised here; ``cos = h @ w.T``. The
    target column ``labels[i]`` (an index into the rows of ``w``) becomes ``cos(theta_y + m)`` with
    ``theta_y = acos(clamp(cos_y, -1 + eps, 1 - eps))``; every column is then divided by ``temperature``.
    ``margin == 0`` leaves the cosines untouched (plain normalised-softmax logits).

    Caveat (as in the paper's formula): for theta_y + m > pi the target logit is not monotone in
    theta_y; with m = 0.2 that only concerns targets almost opposite their prototype.
    """
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"h [B, D] and w [C, D] expected, got {tuple(h.shape)} and {tuple(w.shape)}")
    h = F.normalize(_at_least_fp32(h), dim=-1)
    w = F.normalize(w.to(h.dtype), dim=-1)
    cos = h @ w.T                                             # [B, C]
    if margin != 0.0:
        idx = labels.to(cos.device).long().view(-1, 1)
        cos_y = cos.gather(1, idx)
        theta = torch.acos(cos_y.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
        cos = cos.scatter(1, idx, torch.cos(theta + margin))  # out-of-place: differentiable
    return cos / temperature


def margin_loss(h: Tensor, w: Tensor, labels: Tensor, margin: float, temperature: float) -> Tensor:
    """Cross-entropy (mean over the batch) over ``arcface_logits``."""
    logits = arcface_logits(h, w, labels, margin, temperature)
    return F.cross_entropy(logits, labels.to(logits.device).long().view(-1))


# ----------------------------------------------------------------------------- reranker (PAPER "Reranker")
# Levels follow data.judgments: 0 instance, 1 concept, 2 functional, 3 irrelevant; -1 marks an empty
# slot of a short chunk. Gains are 3 - level, so "more relevant" = larger gain.

def pairwise_logistic_loss(s: Tensor, levels: Tensor, tau: float = 1.0) -> Tensor:
    """Mean over discordant pairs (i more relevant than j, same chunk) of
    w_ij * log(1 + exp(-(s_i - s_j) / tau)), w_ij = max(g_i - g_j, 1). s, levels: [B, M]."""
    valid = levels >= 0
    g = (3 - levels).float()
    s = _at_least_fp32(s).masked_fill(~valid, 0.0)
    pair = (g[:, :, None] > g[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    w = (g[:, :, None] - g[:, None, :]).clamp_min(1.0)
    loss = F.softplus(-(s[:, :, None] - s[:, None, :]) / tau)
    n = pair.sum()
    return (w * loss * pair).sum() / n.clamp_min(1) if n else s.sum() * 0.0


def null_loss(s: Tensor, s_null: Tensor, levels: Tensor, tau: float = 1.0) -> Tensor:
    """Instance matches above the chunk's NULL score, everything else below it:
    mean of log(1 + exp(-(s_i - s_null)/tau)) for level 0 and log(1 + exp(-(s_null - s_i)/tau)) else."""
    valid = levels >= 0
    diff = (_at_least_fp32(s) - _at_least_fp32(s_null)[:, None]).masked_fill(~valid, 0.0) / tau
    sign = torch.where(levels == 0, 1.0, -1.0)
    return (F.softplus(-sign * diff) * valid).sum() / valid.sum().clamp_min(1)


def level_loss(level_logits: Tensor, levels: Tensor) -> Tensor:
    """Cross-entropy of the absolute scorer's 4-level softmax over the filled slots."""
    valid = levels >= 0
    if not valid.any():
        return level_logits.sum() * 0.0
    return F.cross_entropy(_at_least_fp32(level_logits[valid]), levels[valid].long())
