"""The reference PrototypeHead (tests/reference_head.py) and the KNN graph builder: exactness against a
full-softmax reference, selection, refresh, neighbours."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.reference_head import PrototypeHead
from training.head import knn_graph
from training.losses import margin_loss

DIMS, WEIGHTS = [4, 8], [1.0, 0.5]
M, T = 0.2, 0.1


def clustered(n_clusters=4, per=10, dim=8, spread=0.05, seed=0):
    """Planted clusters: rows near n_clusters well-separated (orthogonal) centres."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:n_clusters] * 1.0
    rows = np.concatenate([c + spread * rng.standard_normal((per, dim)) for c in centres]).astype(np.float32)
    return rows, np.repeat(np.arange(n_clusters), per)


def reference(h, w_rows, labels):
    """Full-softmax reference over the given rows, computed directly with margin_loss."""
    total = 0.0
    for dim, wk in zip(DIMS, WEIGHTS):
        hp = torch.nn.functional.normalize(h[:, :dim], dim=-1)
        wp = torch.nn.functional.normalize(w_rows[:, :dim], dim=-1)
        total = total + wk * margin_loss(hp, wp, labels, M, T)
    return total


def make_head(rows, **kw):
    kw = {"dims": DIMS, "weights": WEIGHTS, "margin": M, "temperature": T, **kw}
    return PrototypeHead(rows, **kw)


def test_full_fraction_equals_full_softmax_reference():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 8, generator=g)
    head = make_head(rows, knn_fraction=1.0)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 7, 11, 5])
    loss, stats = head(h, labels)
    loss.backward()
    assert stats["classes_scored"] == 12 and {"loss_d4", "loss_d8"} <= set(stats)

    h_ref = h.detach().clone().requires_grad_()
    w_ref = rows.clone().requires_grad_()
    ref = reference(h_ref, w_ref, labels)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-6, rtol=0)
    assert torch.allclose(head.weight.grad, w_ref.grad, atol=1e-6, rtol=0)
    assert head.weight.grad.abs().sum() > 0


def test_partial_fraction_equals_reference_on_selected_set_and_sparse_grad():
    rows, _ = clustered()
    head = make_head(rows, knn_fraction=0.2)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 8, generator=g, requires_grad=True)
    labels = torch.tensor([2, 25, 2])
    cls = head.select(labels)
    loss, stats = head(h, labels)
    loss.backward()
    assert stats["classes_scored"] == len(cls) < 40

    pos = torch.tensor([cls.tolist().index(y) for y in labels.tolist()])
    h_ref = h.detach().clone().requires_grad_()
    w_ref = torch.from_numpy(rows)[cls].clone().requires_grad_()
    ref = reference(h_ref, w_ref, pos)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-6, rtol=0)
    assert torch.allclose(head.weight.grad[cls], w_ref.grad, atol=1e-6, rtol=0)
    # rows not selected get exactly zero gradient
    unselected = torch.ones(40, dtype=torch.bool)
    unselected[cls] = False
    assert unselected.any()
    assert (head.weight.grad[unselected] == 0).all()
    assert (head.weight.grad[cls].abs().sum(dim=1) > 0).all()


def test_select_knn_contains_targets_and_has_expected_size():
    rows, cluster = clustered(n_clusters=4, per=10)
    head = make_head(rows, knn_fraction=0.2)                 # ceil(0.2 * 40) = 8 neighbours per target
    assert head.knn_k == 8
    one = head.select(torch.tensor([3]))
    assert 3 in one.tolist() and len(one) == 1 + 8
    assert set(cluster[one.numpy()]) == {0}                  # its neighbours are in its own cluster
    two = head.select(torch.tensor([3, 3, 35]))              # different clusters: disjoint unions
    assert {3, 35} <= set(two.tolist()) and len(two) == 18
    assert torch.equal(two, torch.sort(two).values) and len(set(two.tolist())) == len(two)
    # expected size in general: |targets U their graph rows|
    labels = torch.tensor([0, 1, 12, 13, 39])
    expected = set(labels.tolist()) | set(head.graph[labels].reshape(-1).tolist())
    assert set(head.select(labels).tolist()) == expected
    # fraction 1 -> all classes
    assert head.select(labels).numel() < 40
    assert make_head(rows, knn_fraction=1.0).select(labels).tolist() == list(range(40))


def test_select_random_same_size_as_knn_and_contains_targets():
    rows, _ = clustered(n_clusters=4, per=10)
    knn = make_head(rows, knn_fraction=0.2)
    rnd = make_head(rows, knn_fraction=0.2, sampler="random", seed=3)
    for labels in ([3], [3, 35], [0, 1, 12, 13, 39], [5, 5, 5]):
        lab = torch.tensor(labels)
        a, b = knn.select(lab), rnd.select(lab)
        assert len(b) == len(a)
        assert set(labels) <= set(b.tolist())
        assert torch.equal(b, torch.sort(b).values) and len(set(b.tolist())) == len(b)
    # random really is random: draws differ across steps and usually cross clusters
    draws = {tuple(rnd.select(torch.tensor([3])).tolist()) for _ in range(5)}
    assert len(draws) > 1


def test_refresh_every_refresh_steps():
    rows, cluster = clustered(n_clusters=4, per=10)
    head = make_head(rows, knn_fraction=0.2, refresh_steps=3)
    before = head.graph.clone()
    n0 = head.num_refreshes
    # move the rows: row i takes the place of row perm[i] (clusters get relabelled)
    perm = torch.roll(torch.arange(40), 10)
    with torch.no_grad():
        head.weight.copy_(head.weight[perm])
    h, labels = torch.randn(2, 8), torch.tensor([0, 20])
    for _ in range(2):
        head(h, labels)
        assert torch.equal(head.graph, before) and head.num_refreshes == n0
    head(h, labels)                                          # third step: dynamic proxy update
    assert head.num_refreshes == n0 + 1
    assert not torch.equal(head.graph, before)
    assert torch.equal(head.graph, torch.from_numpy(knn_graph(head.weight, 8)))
    new_cluster = cluster[perm.numpy()]
    assert all(set(new_cluster[head.graph[i].numpy()]) == {new_cluster[i]} for i in range(40))
    for _ in range(3):
        head(h, labels)
    assert head.num_refreshes == n0 + 2
    # eval-mode forwards do not advance the schedule
    head.eval()
    step = int(head.step)
    head(h, labels)
    assert int(head.step) == step


def test_neighbours_are_nearest():
    rows, cluster = clustered(n_clusters=4, per=10)
    head = make_head(rows)
    nb = head.neighbours(5)
    assert nb.shape == (40, 5)
    for i in range(40):
        assert i not in nb[i]
        assert set(cluster[nb[i]]) == {cluster[i]}
    # against brute force on random rows (no ties)
    x = np.random.default_rng(2).standard_normal((30, 6)).astype(np.float32)
    head = make_head(x, dims=[6], weights=[1.0])
    nb = head.neighbours(4)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    brute = np.argsort(-sim, axis=1)[:, :4]
    assert np.array_equal(nb, brute)


def test_knn_graph_excludes_self_even_with_duplicates():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    g = knn_graph(x, 2)
    assert all(i not in g[i] for i in range(4))
    assert g[0, 0] == 1 and g[1, 0] == 0


def test_bad_labels_rejected():
    head = make_head(np.eye(8, dtype=np.float32)[:5])
    with pytest.raises(ValueError):
        head.select(torch.tensor([5]))


def test_state_dict_roundtrip_rebuilds_graph():
    rows, _ = clustered()
    head = make_head(rows, knn_fraction=0.2)
    other = make_head(np.roll(rows, 10, axis=0), knn_fraction=0.2)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.graph, head.graph)
    assert torch.equal(other.weight, head.weight)


def test_sparse_sgd_step_matches_momentum_sgd_on_touched_rows_and_leaves_the_rest():
    rows, _ = clustered()
    head = make_head(rows, knn_fraction=0.1, refresh_steps=0)
    ref = torch.nn.Parameter(head.weight.detach().clone())
    opt = torch.optim.SGD([ref], lr=0.3, momentum=0.9)
    labels = torch.tensor([0, 1, 2])
    h = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    before = head.weight.detach().clone()
    for _ in range(2):   # the same rows twice: lazy momentum == torch momentum SGD on them
        loss, _ = head(h, labels)
        loss.backward()
        ref.grad = head.weight.grad.clone()
        touched = ref.grad.abs().sum(1) > 0
        moved = head.sparse_sgd_step(lr=0.3, momentum=0.9)
        opt.step()
        assert moved == int(touched.sum()) and head.weight.grad is None
    assert torch.allclose(head.weight[touched], ref[touched], atol=1e-6)
    assert torch.equal(head.weight[~touched], before[~touched])        # untouched rows never move
    assert torch.count_nonzero(head.velocity[~touched]) == 0
    assert 0 < int(touched.sum()) < head.num_classes
