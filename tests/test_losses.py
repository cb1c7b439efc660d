"""training/losses.py against hand-computed references (math / numpy, not the code under test)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import arcface_logits, info_nce, info_nce_mrl, margin_loss, mrl_prefix


def _unit(*angles_deg):
    return [[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg]


# 3 x 2 example: q_i and d_j on the unit circle, so <q_i, d_j> = cos(angle_q_i - angle_d_j)
Q_DEG = (0.0, 100.0, 210.0)
D_DEG = (20.0, 90.0, 250.0)
T = 0.5


def _ce_row(logits, target):
    """-log softmax(logits)[target] for one row, -inf entries excluded."""
    m = max(x for x in logits if x != -math.inf)
    z = sum(math.exp(x - m) for x in logits if x != -math.inf)
    return -(logits[target] - m - math.log(z))


def _reference(q_deg, d_deg, t, hard_deg=None, same=None):
    """Symmetric InfoNCE by hand. hard_deg[i]: list of hard-negative angles for row i;
    same: set of (i, j) pairs (i != j) masked out of the in-batch columns."""
    b = len(q_deg)
    same = same or set()
    sim = [[math.cos(math.radians(q_deg[i] - d_deg[j])) / t for j in range(b)] for i in range(b)]
    qd, dq = [], []
    for i in range(b):
        row = [(-math.inf if (i, j) in same else sim[i][j]) for j in range(b)]
        if hard_deg is not None:
            row += [math.cos(math.radians(q_deg[i] - a)) / t for a in hard_deg[i]]
        qd.append(_ce_row(row, i))
        col = [(-math.inf if (i, j) in same else sim[j][i]) for j in range(b)]   # d_i against all q_j
        dq.append(_ce_row(col, i))
    return 0.5 * (sum(qd) / b + sum(dq) / b)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_info_nce_matches_hand_computed_3x2():
    q, d = _t(_unit(*Q_DEG)), _t(_unit(*D_DEG))
    got = info_nce(q, d, T).item()
    expected = _reference(Q_DEG, D_DEG, T)
    assert got == pytest.approx(expected, abs=1e-10)
    # and a literal spot check of one direction with numpy
    s = np.cos(np.radians(np.subtract.outer(Q_DEG, D_DEG))) / T
    l_qd = np.mean([-s[i, i] + np.log(np.exp(s[i]).sum()) for i in range(3)])
    l_dq = np.mean([-s[i, i] + np.log(np.exp(s[:, i]).sum()) for i in range(3)])
    assert got == pytest.approx(0.5 * (l_qd + l_dq), abs=1e-10)


def test_info_nce_is_symmetric_in_views():
    q, d = _t(_unit(*Q_DEG)), _t(_unit(*D_DEG))
    assert info_nce(q, d, T).item() == pytest.approx(info_nce(d, q, T).item(), abs=1e-12)


def test_hard_negatives_add_columns():
    q, d = _t(_unit(*Q_DEG)), _t(_unit(*D_DEG))
    base = info_nce(q, d, T).item()
    hard_deg = [[45.0], [300.0], [120.0]]
    hn = _t([_unit(*h) for h in hard_deg])                    # [3, 1, 2]
    got = info_nce(q, d, T, hard_negatives=hn).item()
    assert got == pytest.approx(_reference(Q_DEG, D_DEG, T, hard_deg=hard_deg), abs=1e-10)
    assert got > base
    # a hard negative that equals the positive: the q->d row holds the positive twice
    dup = d[:, None, :].clone()
    got_dup = info_nce(q, d, T, hard_negatives=dup).item()
    assert got_dup == pytest.approx(_reference(Q_DEG, D_DEG, T, hard_deg=[[a] for a in D_DEG]), abs=1e-10)
    assert got_dup > base + 0.1


def test_same_instance_columns_are_masked():
    q, d = _t(_unit(*Q_DEG)), _t(_unit(*D_DEG))
    labels = torch.tensor([7, 7, 3])                          # rows 0 and 1: one instance
    got = info_nce(q, d, T, labels=labels).item()
    expected = _reference(Q_DEG, D_DEG, T, same={(0, 1), (1, 0)})
    assert got == pytest.approx(expected, abs=1e-10)
    assert got < info_nce(q, d, T).item()                     # fewer negatives -> lower loss
    # all-distinct labels change nothing
    assert info_nce(q, d, T, labels=torch.tensor([0, 1, 2])).item() == pytest.approx(info_nce(q, d, T).item())


def test_info_nce_gradients_finite_with_mask():
    q = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    d = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    loss = info_nce(q, d, 0.05, labels=torch.tensor([0, 0, 0, 1, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all()


def test_info_nce_mrl_is_weighted_sum_of_prefix_losses():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    hn = torch.randn(5, 2, 12, generator=g)
    labels = torch.tensor([0, 1, 1, 2, 3])
    dims, weights, temps = [4, 8, 12], [0.5, 1.0, 2.0], [0.1, 0.07, 0.05]
    loss, parts = info_nce_mrl(q, d, dims, weights, temps, hard_negatives=hn, labels=labels)
    expected = 0.0
    for dim, w, t in zip(dims, weights, temps):
        qn = q[:, :dim] / q[:, :dim].norm(dim=-1, keepdim=True)
        dn = d[:, :dim] / d[:, :dim].norm(dim=-1, keepdim=True)
        hnn = hn[..., :dim] / hn[..., :dim].norm(dim=-1, keepdim=True)
        part = info_nce(qn, dn, t, hnn, labels).item()
        assert parts[dim] == pytest.approx(part, rel=1e-5)
        expected += w * part
    assert set(parts) == set(dims)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mrl_prefix_normalises_the_prefix():
    x = torch.tensor([[3.0, 4.0, 100.0]])
    assert torch.allclose(mrl_prefix(x, 2), torch.tensor([[0.6, 0.8]]))
    with pytest.raises(ValueError):
        mrl_prefix(x, 4)


def test_arcface_logits_hand_made_2d():
    # h0 at 0 deg (label 0), h1 at 50 deg (label 1); w0 at 30 deg, w1 at 100 deg (un-normalised inputs)
    h = _t([[3.0, 0.0], [2 * math.cos(math.radians(50)), 2 * math.sin(math.radians(50))]])
    w = _t([[0.5 * c for c in _unit(30)[0]], [4 * c for c in _unit(100)[0]]])
    labels = torch.tensor([0, 1])
    m, t = 0.3, 0.1
    got = arcface_logits(h, w, labels, m, t)
    rad = math.radians
    expected = [
        [math.cos(rad(30) + m) / t, math.cos(rad(100)) / t],          # row 0: target col 0 at 30 deg
        [math.cos(rad(20)) / t, math.cos(rad(50) + m) / t],           # row 1: target col 1 at 50 deg
    ]
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    # the margin lowers exactly the target entries
    plain = arcface_logits(h, w, labels, 0.0, t).numpy()
    assert np.allclose(plain, [[math.cos(rad(30)) / t, math.cos(rad(100)) / t],
                               [math.cos(rad(20)) / t, math.cos(rad(50)) / t]], atol=1e-10)
    assert got[0, 0] < plain[0, 0] and got[1, 1] < plain[1, 1]


def test_margin_zero_is_normalised_softmax_ce():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    t = 0.2
    hn = h.numpy() / np.linalg.norm(h.numpy(), axis=1, keepdims=True)
    wn = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
    logits = hn @ wn.T / t
    ref = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, y] for i, y in enumerate(labels.tolist())])
    assert margin_loss(h, w, labels, 0.0, t).item() == pytest.approx(ref, abs=1e-10)
    # a positive margin makes the task harder
    assert margin_loss(h, w, labels, 0.2, t).item() > ref


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_margin_loss_gradient_finite_at_cos_pm1(sign):
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    h = (sign * torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])).requires_grad_()   # cos_y = +-1 exactly
    labels = torch.tensor([0, 2])
    loss = margin_loss(h, w, labels, 0.5, 0.05)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
