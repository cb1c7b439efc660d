"""training/head/: the tensor-parallel prototype head against single-process references.

Two gloo runs of 2 CPU processes (tests/sharded_head_worker.py) are shared by the module: run "a"
(exactness, DDP, graph, training with a checkpoint, bf16, bad input) and run "b" (resume and
re-sharding 1 -> 2, shard() of a head built before the process group). Between them this process
trains the same problem at world size 1 and writes the 1-rank checkpoint run "b" re-shards.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests import sharded_head_worker as wk
from tests.reference_head import PrototypeHead
from training.head import ShardedPrototypeHead, head_cost, knn_graph
from training.head.sharded import random_select_large
from training.head.storage import hash_uniform, stochastic_round
from training.losses import margin_loss

W = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    wk.launch("a", W, out)
    # world size 1, same problem: trajectory, and the checkpoint run "b" loads into 2 ranks
    head = ShardedPrototypeHead(wk.rows(), **wk.head_kwargs(knn_fraction=0.2, refresh_steps=2))
    w1 = wk.train(head, 0, 1, range(wk.SAVE_AT))
    head.save_sharded(out / "ckpt_w1")
    w1_rows = head.rows.clone()
    w1 += wk.train(head, 0, 1, range(wk.SAVE_AT, wk.TRAIN_STEPS))
    wk.launch("b", W, out)

    def load(name):
        return [torch.load(out / f"{name}_r{r}.pt", weights_only=False) for r in range(W)]
    return {"out": out, "load": load, "w1_losses": w1, "w1_rows": w1_rows}


def reference(h, w_rows, labels):
    """Single-process loss: margin_loss over the given rows, summed over prefixes with weights."""
    total = 0.0
    for dim, wk_ in zip(wk.DIMS, wk.WEIGHTS):
        hp = torch.nn.functional.normalize(h[:, :dim], dim=-1)
        wp = torch.nn.functional.normalize(w_rows[:, :dim], dim=-1)
        total = total + wk_ * margin_loss(hp, wp, labels, wk.MARGIN, wk.TAU)
    return total


def check_against_reference(res, step=0):
    """Loss, dL/dh and dL/drows of a 2-rank step equal the reference on the same scored set."""
    ids = torch.cat([r["row_ids"] for r in res])
    order = torch.argsort(ids)
    cls = ids[order]
    row_grad = torch.cat([r["row_grad"] for r in res])[order]
    h, y = wk.batch(step)
    h_ref = h.clone().requires_grad_()
    w_ref = torch.from_numpy(wk.rows())[cls].clone().requires_grad_()
    ref = reference(h_ref, w_ref, torch.searchsorted(cls, y))
    ref.backward()
    for r in res:
        assert r["loss"] == pytest.approx(ref.item(), abs=1e-5)
        assert r["stats"]["classes_scored"] == cls.numel()
    # under DDP's 1/W average, W * dL/dh_r is what makes the backbone gradient exact
    h_grad = torch.cat([r["h_grad"] for r in res]) / W
    torch.testing.assert_close(h_grad, h_ref.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(row_grad, w_ref.grad, atol=1e-5, rtol=0)
    return cls


def test_full_fraction_equals_full_softmax_reference(runs):
    cls = check_against_reference(runs["load"]("full"))
    assert cls.tolist() == list(range(wk.U))
    assert all(r["stats"]["classes_local"] == wk.U // W for r in runs["load"]("full"))


@pytest.mark.parametrize("sampler", ["knn", "random"])
def test_sparse_selection_equals_reference_on_same_set(runs, sampler):
    cls = check_against_reference(runs["load"](sampler))
    assert cls.numel() < wk.U
    # the same set a single-process PrototypeHead selects (same graph, same RNG stream)
    single = PrototypeHead(wk.rows(), **wk.head_kwargs(knn_fraction=0.2, sampler=sampler, seed=3))
    assert torch.equal(single.select(wk.batch(0)[1]), cls)


def test_ddp_backbone_gradient_equals_single_process(runs):
    res = runs["load"]("ddp")
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, wk.D)
    x = torch.randn(wk.N, 6, generator=torch.Generator().manual_seed(7))
    y = wk.batch(0)[1]
    cls = PrototypeHead(wk.rows(), **wk.head_kwargs(knn_fraction=0.2)).select(y)
    ref = reference(backbone(x), torch.from_numpy(wk.rows())[cls], torch.searchsorted(cls, y))
    ref.backward()
    for r in res:
        assert r["loss"] == pytest.approx(ref.item(), abs=1e-5)
        torch.testing.assert_close(r["grad_w"], backbone.weight.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(r["grad_b"], backbone.bias.grad, atol=1e-5, rtol=0)


def test_ring_graph_and_neighbours_equal_exact_knn(runs):
    res = runs["load"]("graph")
    exact8, exact5 = knn_graph(wk.rows(), 8), knn_graph(wk.rows(), 5)
    for r in res:
        assert r["local"].dtype == torch.int32
        for i, row in zip(r["ids"].tolist(), r["local"].tolist()):
            assert set(row) == set(exact8[i].tolist())
        assert np.array_equal(r["neighbours"], res[0]["neighbours"])
        assert all(set(a) == set(b) for a, b in zip(r["neighbours"].tolist(), exact5.tolist()))


@pytest.mark.parametrize("fraction,sampler", [(1.0, "knn"), (0.2, "knn"), (0.2, "random")])
def test_world1_equals_prototype_head(fraction, sampler):
    kw = wk.head_kwargs(knn_fraction=fraction, refresh_steps=3, sampler=sampler, seed=3)
    ref, head = PrototypeHead(wk.rows(), **kw), ShardedPrototypeHead(wk.rows(), **kw)
    assert head.world_size == 1 and head.num_classes == ref.num_classes and head.knn_k == ref.knn_k
    assert not list(head.parameters()) and not list(head.buffers())      # nothing for DDP to sync
    for step in range(7):   # includes two graph refreshes from moved rows
        h, y = wk.batch(step)
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        (l1, s1), (l2, s2) = ref(h1, y), head(h2, y)
        l1.backward()
        l2.backward()
        assert l2.item() == pytest.approx(l1.item(), rel=1e-6, abs=1e-6)
        assert s1["classes_scored"] == s2["classes_scored"] and s2["loss_d4"] == pytest.approx(s1["loss_d4"], rel=1e-6)
        torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=0)
        assert ref.sparse_sgd_step(wk.LR, wk.MOMENTUM) == head.sparse_sgd_step(wk.LR, wk.MOMENTUM)
        torch.testing.assert_close(head.rows, ref.weight.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(head.momentum, ref.velocity, atol=1e-6, rtol=0)
    assert head.num_refreshes == ref.num_refreshes == 3


def test_gradient_accumulation_sums_like_a_grad():
    kw = wk.head_kwargs(knn_fraction=0.2)
    ref, head = PrototypeHead(wk.rows(), **kw), ShardedPrototypeHead(wk.rows(), **kw)
    for step in (0, 1):   # two micro-batches, one update
        h, y = wk.batch(step)
        ref(h, y)[0].backward()
        head(h, y)[0].backward()
    assert ref.sparse_sgd_step(wk.LR) == head.sparse_sgd_step(wk.LR) > 0
    torch.testing.assert_close(head.rows, ref.weight.detach(), atol=1e-6, rtol=0)
    assert head.sparse_sgd_step(wk.LR) == 0   # gradients are consumed


def test_resume_from_sharded_checkpoint_continues_identically(runs):
    a, b = runs["load"]("train"), runs["load"]("ckpt_w2")
    for ra, rb in zip(a, b):
        assert rb["step"] == wk.SAVE_AT
        assert rb["losses"] == pytest.approx(ra["losses"][wk.SAVE_AT:], abs=1e-6)


def test_reshard_2_to_1_and_1_to_2(runs):
    a = runs["load"]("train")
    # 2 -> 1: identical rows (rank r held rows r, r + 2, ...), identical next losses
    head = ShardedPrototypeHead(np.ones((wk.U, wk.D), np.float32), **wk.head_kwargs(knn_fraction=0.2, refresh_steps=2),
                                build_graph=False)
    head.load_sharded(runs["out"] / "ckpt_w2")
    saved = torch.empty(wk.U, wk.D)
    for r in a:
        saved[r["ids"]] = r["rows_at_save"]
    assert torch.equal(head.rows, saved)
    assert wk.train(head, 0, 1, range(wk.SAVE_AT, wk.TRAIN_STEPS)) == pytest.approx(a[0]["losses"][wk.SAVE_AT:], abs=1e-5)
    # 1 -> 2: the 2-rank continuation of the world-1 checkpoint follows the world-1 run
    w1 = runs["w1_losses"]
    for rb in runs["load"]("ckpt_w1"):
        assert rb["losses"] == pytest.approx(w1[wk.SAVE_AT:], abs=1e-5)
        assert torch.equal(rb["rows"], runs["w1_rows"][rb["ids"]])
    # and the whole 2-rank trajectory equals the 1-rank one on the same global batches
    assert a[0]["losses"] == pytest.approx(w1, abs=1e-5)


def test_shard_splits_a_head_built_before_the_process_group(runs):
    shard, direct = runs["load"]("shard"), runs["load"]("knn")
    for s, d in zip(shard, direct):
        assert s["loss"] == pytest.approx(d["loss"], abs=1e-6)
        torch.testing.assert_close(s["h_grad"], d["h_grad"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_stay_close_to_fp32(runs, dtype):
    # no refresh: a graph rebuilt from slightly different rows may legitimately score another set
    kw = wk.head_kwargs(knn_fraction=0.2, refresh_steps=0)
    fp32 = ShardedPrototypeHead(wk.rows(), **kw)
    low = ShardedPrototypeHead(wk.rows(), **kw, row_dtype=dtype, momentum_dtype=dtype)
    l32 = wk.train(fp32, 0, 1, range(wk.TRAIN_STEPS))
    llow = wk.train(low, 0, 1, range(wk.TRAIN_STEPS))
    assert low.rows.dtype == dtype and low.momentum.dtype == dtype
    assert llow == pytest.approx(l32, rel=2e-2)
    torch.testing.assert_close(low.rows.float(), fp32.rows, atol=1e-2, rtol=2e-2)   # ~ulps
    for r in runs["load"]("train_bf16"):   # 2 ranks, bf16 rows, fp32 momentum
        assert r["losses"] == pytest.approx(r["losses_fp32"], rel=2e-2)
        torch.testing.assert_close(r["rows"], r["rows_fp32"], atol=1e-2, rtol=2e-2)


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((4096, 16), 0.1234567)
    u = hash_uniform(torch.arange(4096), 16, step=5, seed=0)
    assert torch.equal(u, hash_uniform(torch.arange(4096), 16, step=5, seed=0))
    assert not torch.equal(u, hash_uniform(torch.arange(4096), 16, step=6, seed=0))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    for dtype in (torch.bfloat16, torch.float16):
        r = stochastic_round(x, dtype, u).float()
        lo, hi = r.unique().tolist()                            # only the two neighbours of x
        p_hi = (0.1234567 - lo) / (hi - lo)
        assert abs(float((r == hi).float().mean()) - p_hi) < 0.01   # E[r] = x (65536 draws: sd 0.002)
    assert torch.equal(stochastic_round(x, torch.float32, u), x)


def test_random_select_large_is_uniform_and_keeps_targets():
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([5, 5, 17, 99])
    counts = torch.zeros(100)
    for _ in range(400):
        s = random_select_large(targets, 30, 100, g)
        assert s.numel() == 30 and torch.equal(s, torch.unique(s)) and {5, 17, 99} <= set(s.tolist())
        counts[s] += 1
    others = counts[[i for i in range(100) if i not in (5, 17, 99)]]
    assert abs(float(others.mean()) - 400 * 27 / 97) < 1 and float(others.std()) < 20


def test_approximate_graph_has_high_recall_on_clustered_rows():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 16)).astype(np.float32)
    x = (np.repeat(centres, 40, axis=0) + 0.1 * rng.standard_normal((2000, 16))).astype(np.float32)
    head = ShardedPrototypeHead(x, dims=[16], weights=[1.0], margin=0.2, temperature=0.1, knn_k=10, approx_above=500)
    assert head.graph_index.startswith("IVF") and head.graph.shape == (2000, 10) and head.graph.dtype == torch.int32
    exact = knn_graph(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(head.graph.tolist(), exact.tolist())])
    assert recall > 0.9
    assert all(i not in row for i, row in enumerate(head.graph.tolist()))


def test_bad_input_raises_value_error(runs):
    rows = wk.rows()
    kw = wk.head_kwargs(knn_fraction=0.2)
    with pytest.raises(ValueError, match="MRL dims"):
        ShardedPrototypeHead(rows, **{**kw, "dims": [4, 16]})           # dims wider than the rows
    for bad in ({"sampler": "hard"}, {"knn_fraction": 0.0}, {"knn_k": wk.U}, {"temperature": 0.0},
                {"row_dtype": torch.int8}, {"weights": [1.0]}):
        with pytest.raises(ValueError):
            ShardedPrototypeHead(rows, **{**kw, **bad})
    with pytest.raises(ValueError, match=r"\[U, D\]"):
        ShardedPrototypeHead(rows[0], **kw)
    head = ShardedPrototypeHead(rows, **kw)
    h, y = wk.batch(0)
    for args, msg in [((h, torch.full_like(y, wk.U)), "labels outside"), ((h, -y - 1), "labels outside"),
                      ((h, y[:3]), "one label per row"), ((h[:, :6], y), "embedding width"),
                      ((h.long(), y), "float")]:
        with pytest.raises(ValueError, match=msg):
            head(*args)
    assert head.step == 0                                                # a bad batch changes nothing
    with pytest.raises(ValueError, match="graph must be"):
        head.set_graph(torch.zeros(wk.U, 3, dtype=torch.long))
    other = ShardedPrototypeHead(np.ones((wk.U + 1, wk.D), np.float32), **kw)
    with pytest.raises(ValueError, match="U=40"):
        other.load_sharded(runs["out"] / "ckpt_w1")
    with pytest.raises(ValueError, match="meta.json"):
        head.load_sharded(runs["out"] / "nowhere")
    # on 2 ranks: one rank's bad labels / width make *both* raise; U < world size
    for r in runs["load"]("errors"):
        assert "labels outside" in r[0] and "embedding width" in r[1] and "U < world size" in r[2]


def test_head_cost_model():
    c1 = head_cost(10**7, 128, 1, row_bytes=4, batch=64, knn_k=64)
    mem = c1["bytes_per_shard"]
    assert mem["rows"] == 10**7 * 128 * 4 and mem["momentum"] == mem["rows"] and mem["graph"] == 10**7 * 64 * 4
    assert c1["comm_bytes"]["per_step"] == 0 and c1["classes_scored_max"] == 64 * 65
    c8 = head_cost(10**7, 128, 8, row_bytes=2, batch=64, knn_k=64)
    assert c8["bytes_per_shard"]["rows"] == math.ceil(10**7 / 8) * 128 * 2
    assert c8["comm_bytes"]["allgather_embeddings"] == pytest.approx(7 / 8 * 64 * 128 * 2)
    paper = head_cost(10**9, 512, 64, row_bytes=2, batch=256, knn_k=64, momentum_bytes=2, gpu_bytes=80e9)
    g = paper["gpus_needed"]
    assert 20 < g < 100
    assert head_cost(10**9, 512, g, row_bytes=2, batch=256, knn_k=64, momentum_bytes=2)["bytes_per_shard"]["total"] <= 80e9
    assert head_cost(10**9, 512, g - 1, row_bytes=2, batch=256, knn_k=64, momentum_bytes=2)["bytes_per_shard"]["total"] > 80e9
    # fraction 0.1 of a billion: every target drags 1e8 negatives, i.e. the full softmax
    assert head_cost(10**9, 512, g, fraction=0.1)["classes_scored_max"] == 10**9
