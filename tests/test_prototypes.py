"""Stage-2 prototype curation on planted embeddings: merges of duplicate listings, pruning of
drifting members, absorption of the long tail, centroids, determinism and stage-3 labels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.prototypes import curate, prototype_labels

CFG = {"organizer_k": 10, "organizer_threshold": 0.9, "reviewer_z": 2.5, "text_weight": 0.0}
D = 32


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def orth(v, rng):
    """A random unit vector orthogonal to the unit vector v."""
    o = rng.standard_normal(len(v))
    o -= (o @ v) * v
    return unit(o)


class Catalog:
    def __init__(self):
        self.rows, self.embs = [], []

    def add(self, item_id, group_id, emb, category="cat/a"):
        self.rows.append({"item_id": item_id, "title": item_id, "category": category,
                          "group_id": group_id})
        self.embs.append(unit(emb))

    def frame(self):
        return pd.DataFrame(self.rows).astype("string"), np.array(self.embs, dtype=np.float32)


def planted(seed=0, extra=None):
    """30 clean instances (2-3 members, cos ~0.96 to their direction), a duplicate listing
    (groups dupA / dupB, near-identical members) and a group `out` whose member out_2 points
    elsewhere."""
    rng = np.random.default_rng(seed)
    dirs = unit(rng.standard_normal((32, D)))
    cat = Catalog()
    for g in range(30):
        for m in range(2 + g % 2):
            cat.add(f"g{g:02d}_{m}", f"g{g:02d}", dirs[g] + 0.05 * rng.standard_normal(D),
                    category=f"cat/{g % 4}")
    for group in ("dupA", "dupB"):
        for m in range(2):
            cat.add(f"{group}_{m}", group, dirs[30] + 0.01 * rng.standard_normal(D))
    cat.add("out_0", "out", dirs[31] + 0.05 * rng.standard_normal(D))
    cat.add("out_1", "out", dirs[31] + 0.05 * rng.standard_normal(D))
    cat.add("out_2", "out", orth(dirs[31], rng))
    if extra:
        extra(cat, rng)
    return cat.frame()


def proto_of(res, item_id):
    a = res.assignment.set_index("item_id")
    return a.loc[item_id, "prototype_id"]


def proto_row(res, pid):
    return res.prototypes.set_index("prototype_id").loc[pid]


def test_duplicate_listing_is_merged_and_logged():
    items, emb = planted()
    dup = emb[items["group_id"].isin(["dupA", "dupB"]).to_numpy()]
    assert (dup @ dup.T).min() > 0.98
    res = curate(items, emb, CFG)
    pid = proto_of(res, "dupA_0")
    assert all(proto_of(res, i) == pid for i in ["dupA_1", "dupB_0", "dupB_1"])
    row = proto_row(res, pid)
    assert row["seed_ids"] == ["dupA", "dupB"]
    assert row["members"] == ["dupA_0", "dupA_1", "dupB_0", "dupB_1"]
    merges = res.report[res.report["kind"] == "merge"]
    assert len(merges) == 1 and res.stats["merges"] == 1
    assert merges.iloc[0]["prototype_id"] == pid and merges.iloc[0]["other"] == "dupB"
    assert merges.iloc[0]["similarity"] > 0.98
    # distinct instances stay apart: every other prototype comes from exactly one seed
    others = res.prototypes[res.prototypes["prototype_id"] != pid]
    assert (others["seed_ids"].map(len) == 1).all()
    assert res.stats["seeds"] == 33 and res.stats["prototypes"] >= 32
    # negative control: above the duplicate's similarity nothing is merged
    strict = curate(items, emb, {**CFG, "organizer_threshold": 0.9999})
    assert strict.stats["merges"] == 0
    assert proto_of(strict, "dupA_0") != proto_of(strict, "dupB_0")


def test_chain_of_mutual_neighbours_is_not_merged_through():
    """A~B (0.94) and B~C (0.93) pass the threshold, A~C (0.75) does not: A and B merge, then
    C's edge to B is rejected because C is far from the merged A+B centroid."""
    gram = np.array([[1, .94, .75], [.94, 1, .93], [.75, .93, 1]])
    basis = np.linalg.cholesky(gram)                          # rows with these inner products
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    vecs = basis @ q[:3]                                      # embed in D dims
    cat = Catalog()
    for name, v in zip("ABC", vecs):
        for m in range(2):
            cat.add(f"{name}_{m}", name, v + 0.002 * rng.standard_normal(D))
    for g in range(6):
        d = rng.standard_normal(D)
        for m in range(2):
            cat.add(f"x{g}_{m}", f"x{g}", d + 0.1 * rng.standard_normal(D))
    items, emb = cat.frame()
    res = curate(items, emb, CFG)
    assert res.stats["merges"] == 1 and res.stats["merges_rejected"] == 1
    assert proto_of(res, "A_0") == proto_of(res, "B_0") != proto_of(res, "C_0")


def test_outlier_member_is_split_off_and_logged():
    items, emb = planted()
    res = curate(items, emb, CFG)
    main, split = proto_of(res, "out_0"), proto_of(res, "out_2")
    assert proto_of(res, "out_1") == main and split != main
    assert proto_row(res, main)["members"] == ["out_0", "out_1"]
    srow = proto_row(res, split)
    assert srow["members"] == ["out_2"] and srow["split_from"] == main
    assert srow["seed_ids"] == ["out"]
    prunes = res.report[(res.report["kind"] == "prune") & (res.report["other"] == "out_2")]
    assert len(prunes) == 1
    assert prunes.iloc[0]["prototype_id"] == main
    assert "drift from centroid" in prunes.iloc[0]["reason"]
    assert split in prunes.iloc[0]["reason"]
    a = res.assignment.set_index("item_id")
    assert a.loc["out_2", "status"] == "seed"     # a seed member is split off, not dropped
    assert a.loc["out_0", "status"] == "seed" and res.stats["split"] >= 1
    # the clean members of the outlier's group are not pruned
    assert not res.report["other"].isin(["out_0", "out_1"]).any()


def test_reviewer_strictness_follows_reviewer_z():
    """With an absurd z nothing is pruned: the split above is the reviewer's doing."""
    items, emb = planted()
    lax = curate(items, emb, {**CFG, "reviewer_z": 1000.0})
    assert lax.stats["split"] == 0 and (lax.report["kind"] != "prune").all()
    assert proto_of(lax, "out_2") == proto_of(lax, "out_0")


def test_centroids_are_normalised_member_means():
    items, emb = planted()
    res = curate(items, emb, CFG)
    c = res.centroids
    assert c.dtype == np.float32 and c.shape == (len(res.prototypes), D)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    index = {i: k for k, i in enumerate(items["item_id"])}
    for row, centroid in zip(res.prototypes.itertuples(), c):
        m = emb[[index[i] for i in row.members]].astype(np.float64)
        np.testing.assert_allclose(centroid, unit(m.mean(axis=0)), atol=1e-6)
        sims = m @ centroid
        assert row.n_members == len(row.members)
        assert row.purity == pytest.approx(sims.mean(), abs=1e-6)
        assert row.spread == pytest.approx(sims.std(), abs=1e-6)
    # ids in order, sorted by first seed id; assignment similarity = cos to own centroid
    assert list(res.prototypes["prototype_id"]) == [f"p{i:06d}" for i in range(len(c))]
    firsts = [s[0] for s in res.prototypes["seed_ids"]]
    assert firsts == sorted(firsts)
    a = res.assignment
    rows = a["prototype_id"].map({p: i for i, p in enumerate(res.prototypes["prototype_id"])})
    np.testing.assert_allclose(a["similarity"],
                               np.einsum("ij,ij->i", emb, c[rows.to_numpy(int)]), atol=1e-5)
    assert proto_row(res, proto_of(res, "g01_0"))["category"] == "cat/1"


def test_deterministic_and_order_invariant():
    items, emb = planted()
    r1, r2 = curate(items, emb, CFG), curate(items, emb, CFG)
    for name in ("prototypes", "assignment", "report"):
        pd.testing.assert_frame_equal(getattr(r1, name), getattr(r2, name))
    np.testing.assert_array_equal(r1.centroids, r2.centroids)
    assert r1.stats == r2.stats
    perm = np.random.default_rng(9).permutation(len(items))
    r3 = curate(items.iloc[perm].reset_index(drop=True), emb[perm], CFG)
    pd.testing.assert_frame_equal(r1.prototypes, r3.prototypes, check_exact=False, atol=1e-6)
    np.testing.assert_allclose(r1.centroids, r3.centroids, atol=1e-6)
    a1 = r1.assignment.sort_values("item_id").reset_index(drop=True)
    a3 = r3.assignment.sort_values("item_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a1, a3, check_exact=False, atol=1e-6)


def _singletons(cos_near, cos_far):
    """A group-less item at cos_near to g03's centroid and one at cos_far to g05's."""
    def extra(cat, rng):
        emb = np.array(cat.embs)
        ids = [r["item_id"] for r in cat.rows]
        for name, group, cos in (("near", "g03", cos_near), ("far", "g05", cos_far)):
            c = unit(emb[[i.startswith(group + "_") for i in ids]].sum(axis=0))
            cat.add(name, None, cos * c + np.sqrt(1 - cos ** 2) * orth(c, rng))
    return extra


def test_singleton_absorbed_only_above_threshold():
    items, emb = planted(extra=_singletons(0.95, 0.85))
    assert items.loc[items["item_id"] == "near", "group_id"].isna().all()
    res = curate(items, emb, CFG)
    a = res.assignment.set_index("item_id")
    assert a.loc["near", "status"] == "absorbed"
    assert a.loc["near", "prototype_id"] == proto_of(res, "g03_0")
    row = proto_row(res, proto_of(res, "g03_0"))
    assert "near" in row["members"] and row["seed_ids"] == ["g03"] and row["n_absorbed"] == 1
    absorbs = res.report[res.report["kind"] == "absorb"]
    assert list(absorbs["other"]) == ["near"]
    assert absorbs.iloc[0]["similarity"] == pytest.approx(0.95, abs=1e-4)
    # below the threshold: stays its own (long-tail) prototype, seeded by its item id
    assert a.loc["far", "status"] == "seed"
    far = proto_row(res, a.loc["far", "prototype_id"])
    assert far["members"] == ["far"] and far["seed_ids"] == ["far"]
    assert res.stats["absorbed"] == 1
    # the same singleton is not absorbed when the threshold is above its similarity
    strict = curate(items, emb, {**CFG, "organizer_threshold": 0.96})
    sa = strict.assignment.set_index("item_id")
    assert sa.loc["near", "status"] == "seed"
    assert proto_row(strict, sa.loc["near", "prototype_id"])["members"] == ["near"]
    assert (strict.report["kind"] != "absorb").all()


def _pulled_away(cat, rng):
    """Cluster `h` (3 tight members); singleton x at cos 0.905 to its centroid on one side and
    four singletons on the other side pull the reviewed centroid away from x."""
    u = unit(rng.standard_normal(D))
    for m in range(3):
        cat.add(f"h_{m}", "h", u + 0.01 * rng.standard_normal(D))
    c = unit(np.array(cat.embs[-3:]).sum(axis=0))
    o = orth(c, rng)
    side = 0.905 * c + np.sqrt(1 - 0.905 ** 2) * o
    cat.add("x", None, side)
    taken = [c, o]
    for k in range(4):
        p = rng.standard_normal(D)
        for b in taken:                      # orthogonal to c, o and the other y's
            p = unit(p - (p @ b) * b)
        taken.append(p)
        cat.add(f"y{k}", None, 0.905 * c + np.sqrt(1 - 0.905 ** 2) * unit(-0.6 * o + 0.8 * p))


def test_absorbed_item_that_drifts_is_unassigned_and_labels_skip_it():
    items, emb = planted(extra=_pulled_away)
    res = curate(items, emb, CFG)
    a = res.assignment.set_index("item_id")
    assert (a.loc[["y0", "y1", "y2", "y3"], "status"] == "absorbed").all()
    assert a.loc["x", "status"] == "pruned" and pd.isna(a.loc["x", "prototype_id"])
    prune = res.report[(res.report["kind"] == "prune") & (res.report["other"] == "x")]
    assert len(prune) == 1 and "absorbed item" in prune.iloc[0]["reason"]
    assert prune.iloc[0]["prototype_id"] == proto_of(res, "h_0")
    assert "x" not in proto_row(res, proto_of(res, "h_0"))["members"]
    assert res.stats["pruned"] == 1
    labels = prototype_labels(res.assignment, res.prototypes)
    assert "x" not in labels
    kept = res.assignment[res.assignment["status"] != "pruned"]
    assert set(labels) == set(kept["item_id"])


def test_prototype_labels_cover_all_non_pruned_items():
    items, emb = planted(extra=_singletons(0.95, 0.85))
    res = curate(items, emb, CFG)
    labels = prototype_labels(res.assignment, res.prototypes)
    assert set(labels) == set(items["item_id"])          # nothing pruned here
    pids = res.prototypes["prototype_id"].tolist()
    for item, pid in zip(res.assignment["item_id"], res.assignment["prototype_id"]):
        assert pids[labels[item]] == pid
        assert item in res.prototypes.iloc[labels[item]]["members"]
    assert set(labels.values()) == set(range(len(pids)))  # every prototype has a class member
    # hand-made table: pruned / unassigned rows are left out
    assignment = pd.DataFrame({"item_id": ["a", "b", "c"], "prototype_id": ["p000001", None, "p000000"],
                               "status": ["seed", "pruned", "absorbed"]})
    protos = pd.DataFrame({"prototype_id": ["p000000", "p000001"]})
    assert prototype_labels(assignment, protos) == {"a": 1, "c": 0}


def test_input_validation_and_text_weight_warning():
    items, emb = planted()
    with pytest.raises(ValueError):
        curate(items, emb[:-1], CFG)
    with pytest.raises(ValueError):
        curate(pd.concat([items, items.iloc[:1]]), np.vstack([emb, emb[:1]]), CFG)
    with pytest.warns(UserWarning, match="text_weight"):
        curate(items, emb, {**CFG, "text_weight": 0.5})


def test_report_names_final_prototype_after_chained_merges():
    """A merge into a root that is itself merged later must name the final prototype."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=16)
    # three singleton seeds: 2~1 merges first (strongest), then their cluster joins 0
    e = np.stack([base + 0.02 * rng.normal(size=16), base + 0.01 * rng.normal(size=16),
                  base + 0.01 * rng.normal(size=16)])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "group_id": ["a", "b", "c"],
                          "title": ["x"] * 3, "category": ["k/l"] * 3})
    res = curate(items, e, {"organizer_k": 2, "organizer_threshold": 0.9, "reviewer_z": 2.5})
    assert len(res.prototypes) == 1
    merges = res.report[res.report["kind"] == "merge"]
    assert len(merges) == 2 and set(merges["prototype_id"]) == {res.prototypes["prototype_id"][0]}
