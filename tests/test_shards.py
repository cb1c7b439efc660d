"""A catalog in shards (data/shards.py): each shard is ingested, validated and embedded alone, the
index holds the union, a removed shard leaves the next index version; in Dagster each shard is a
partition of raw_catalog -> validated_catalog -> item_embeddings, and the catalog sensor follows the
shards. A tiny random-init embedder: no training, well under a minute per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import Paths, dataset_override, deep_merge, load_params
from data.schema import Catalog, CatalogError
from tests.conftest import draw_product

pytestmark = pytest.mark.timeout(300)


def write_shard(root: Path, name: str, n_items: int = 6, seed: int = 0) -> Path:
    """A manifest directory whose item ids carry the shard's name (ids are unique across shards)."""
    d = root / name
    (d / "img").mkdir(parents=True, exist_ok=True)
    items, images = [], []
    for i in range(n_items):
        iid = f"{name}-item{i}"
        draw_product(i, seed=seed, mode="RGB", color=(40 * seed % 255, 90, 200 - 10 * i)).save(d / f"img/{iid}.png")
        items.append({"item_id": iid, "title": f"{name} product {i}", "category": "kitchen/mugs", "group_id": iid,
                      "split": ""})
        images.append({"item_id": iid, "image": f"img/{iid}.png", "view": "catalog"})
    pd.DataFrame(items).to_csv(d / "items.csv", index=False)
    pd.DataFrame(images).to_csv(d / "images.csv", index=False)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from training.backbone import MLLMEmbedder

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("shard_model") / "model"
    MLLMEmbedder.from_params(load_params("tiny")["model"], ["a product"]).save_pretrained(out)
    return out


@pytest.fixture
def sharded(tmp_path, mlflow_uri, model_dir):
    """(params, catalog root) for a two-shard manifest catalog served by the tiny embedder."""
    root = tmp_path / "catalog"
    write_shard(root, "shard0", seed=1)
    write_shard(root, "shard1", seed=2)
    params = load_params("tiny", deep_merge(dataset_override(str(root)),
                                            {"workdir": str(tmp_path / "work"),
                                             "serving": {"model": str(model_dir)}}))
    return params, root


def _update(params: dict, shards=None) -> dict:
    """raw_catalog -> validated_catalog -> item_embeddings -> ann_index, as the catalog_update job runs them."""
    from pailitao.stages.data import raw_catalog, validated_catalog
    from pailitao.stages.retrieval import ann_index, item_embeddings

    out = {f.__name__: f(params, shards=shards).summary() for f in (raw_catalog, validated_catalog, item_embeddings)}
    out["ann_index"] = ann_index(params).summary()
    return out


def _indexed_items(params: dict) -> set[str]:
    from retrieval import index_store

    paths = Paths.from_params(params)
    ids = index_store.load_current(paths.asset("ann_index")).ids
    table = pd.read_parquet(paths.asset("item_embeddings") / "items.parquet").set_index("image_id")
    return set(table.loc[[str(i) for i in ids], "item_id"])


def test_dataset_dir_of_manifests_reads_as_sharded(sharded):
    params, root = sharded
    assert params["dataset"]["sharded"] is True and params["dataset"]["source"] == "manifest"
    assert dataset_override(str(root / "shard0"))["dataset"]["sharded"] is False


def test_a_new_shard_is_ingested_and_embedded_alone_and_the_index_holds_the_union(sharded):
    params, root = sharded
    paths = Paths.from_params(params)
    first = _update(params)
    assert first["item_embeddings"]["shards_built"] == "shard0,shard1"
    assert _indexed_items(params) == {f"shard{k}-item{i}" for k in range(2) for i in range(6)}
    emb0 = paths.asset("item_embeddings") / "shards/shard0/embeddings.npy"
    before = emb0.stat().st_ino, np.load(emb0)

    write_shard(root, "shard2", n_items=3, seed=3)
    second = _update(params)
    for stage in ("raw_catalog", "validated_catalog", "item_embeddings"):
        assert second[stage]["shards_built"] == "shard2", stage
        assert second[stage]["shard_count"] == 3
    assert second["item_embeddings"]["images_embedded"] == 3
    assert emb0.stat().st_ino == before[0] and np.array_equal(np.load(emb0), before[1])   # hard-linked, not re-made
    assert second["ann_index"]["n"] == 15 and second["ann_index"]["version"] != first["ann_index"]["version"]
    assert _indexed_items(params) == {f"shard{k}-item{i}" for k in range(2) for i in range(6)} | {
        f"shard2-item{i}" for i in range(3)}
    union = Catalog.load(paths.asset("validated_catalog"))
    assert union.shards == ["shard0", "shard1", "shard2"] and len(union.items) == 15
    assert union.meta["root"] == str(root) and union.meta["items"] == 15 and union.meta["instances"] == 15
    assert all(union.image_file(p).is_file() for p in union.images["path"])
    emb = np.load(paths.asset("item_embeddings") / "embeddings.npy")
    assert np.array_equal(emb[:6], before[1])   # the union starts with shard0's rows, unchanged


def test_a_changed_shard_is_rebuilt_alone_and_a_removed_one_leaves_the_index(sharded):
    params, root = sharded
    _update(params)
    items = root / "shard1/items.csv"
    items.write_text(items.read_text().replace("shard1 product 0", "shard1 product zero"))
    changed = _update(params)
    assert changed["raw_catalog"]["shards_built"] == "shard1" and changed["item_embeddings"]["shards_built"] == "shard1"
    shutil.rmtree(root / "shard0")
    dropped = _update(params)
    assert dropped["raw_catalog"]["shard_count"] == 1 and dropped["item_embeddings"]["shards_built_count"] == 0
    assert _indexed_items(params) == {f"shard1-item{i}" for i in range(6)}
    assert not (Paths.from_params(params).asset("item_embeddings") / "shards/shard0").exists()


def test_one_shard_asked_for_leaves_the_others_as_they_are(sharded):
    from pailitao.stages.data import raw_catalog

    params, root = sharded
    res = raw_catalog(params, shards=["shard1"])
    assert res.info["shards"] == "shard1" and res.metrics["items"] == 6
    res = raw_catalog(params, shards=["shard0"])
    assert res.info["shards"] == "shard0,shard1" and res.info["shards_built"] == "shard0"
    with pytest.raises(CatalogError, match="shard9 not in"):
        raw_catalog(params, shards=["shard9"])


def test_bad_shards_are_refused_with_their_names(sharded):
    from pailitao.stages.data import raw_catalog

    params, root = sharded
    twin = root / "shard1/items.csv"
    twin.write_text(twin.read_text().replace("shard1-item0,", "shard0-item0,"))
    (root / "shard1/images.csv").write_text((root / "shard1/images.csv").read_text()
                                            .replace("shard1-item0,", "shard0-item0,"))
    with pytest.raises(CatalogError, match="'shard0-item0' is in shard 'shard0' and in shard 'shard1'"):
        raw_catalog(params)
    assert not Paths.from_params(params).asset("raw_catalog").exists()   # nothing half-written
    (root / "bad name").mkdir()
    with pytest.raises(CatalogError, match="bad name: a shard's directory name"):
        raw_catalog(params)


def test_shards_are_dagster_partitions_and_the_sensor_follows_them(sharded, monkeypatch):
    from dagster import AssetKey, DagsterInstance, build_sensor_context, instance_for_test

    from orchestration.assets import CATALOG_SHARDS, sync_shards
    from orchestration.definitions import defs

    params, root = sharded
    monkeypatch.setenv("PAILITAO_DATASET", str(root))
    monkeypatch.setenv("PAILITAO_PROFILE", "tiny")
    run_config = {"resources": {"pipeline": {"config": {
        "profile": "tiny", "dataset": str(root), "workdir": params["workdir"],
        "sets": [f"serving.model={params['serving']['model']}"]}}}}
    job = defs.resolve_job_def("catalog_update")

    def materialized(result) -> dict:
        return {(m.asset_key.to_user_string(), m.partition): m.metadata
                for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())}

    with instance_for_test() as instance:
        instance: DagsterInstance
        sync_shards(instance, ["shard0", "shard1"])
        for shard in ("shard0", "shard1"):   # one run per partition
            result = job.execute_in_process(instance=instance, partition_key=shard, run_config=run_config)
            assert result.success
            done = materialized(result)
            assert {k for k in done if k[1]} == {(a, shard) for a in ("raw_catalog", "validated_catalog",
                                                                     "item_embeddings")}
            assert done[("item_embeddings", shard)]["shards_built"].value == shard
            checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
            assert {c.check_name for c in checks} >= {"ann_index_recall", "unique_item_id", "images_decode"}
        assert instance.get_materialized_partitions(AssetKey("item_embeddings")) == {"shard0", "shard1"}
        # a backfill over both partitions (and the lineage job over every one) is one run
        result = job.execute_in_process(instance=instance, run_config=run_config, tags=sync_shards(
            instance, ["shard0", "shard1"]))
        done = materialized(result)
        assert {k for k in done if k[1]} == {(a, s) for a in ("raw_catalog", "validated_catalog", "item_embeddings")
                                             for s in ("shard0", "shard1")}
        assert done[("raw_catalog", "shard0")]["shards_requested"].value == "shard0,shard1"
        assert done[("item_embeddings", "shard1")]["shards_built"].value == "(none: all up to date)"

        def tick(cursor):
            return defs.resolve_sensor_def("new_catalog_version").evaluate_tick(build_sensor_context(
                cursor=cursor, instance=instance, instance_ref=instance.get_ref(), definitions=defs))

        first = tick(None)   # nothing seen yet: one run per shard (each finds itself up to date)
        assert sorted(r.partition_key for r in first.run_requests) == ["shard0", "shard1"]
        assert all(r.job_name == "catalog_update" for r in first.run_requests)
        assert tick(first.cursor).skip_message == "2 shards unchanged"

        write_shard(root, "shard2", n_items=3, seed=3)
        added = tick(first.cursor)
        assert [r.partition_key for r in added.run_requests] == ["shard2"]
        assert [(type(r).__name__, r.partition_keys) for r in added.dynamic_partitions_requests] == [
            ("AddDynamicPartitionsRequest", ["shard2"])]
        instance.add_dynamic_partitions(CATALOG_SHARDS.name, ["shard2"])
        result = job.execute_in_process(instance=instance, partition_key="shard2", run_config=run_config)
        done = materialized(result)
        assert done[("item_embeddings", "shard2")]["shards_built"].value == "shard2"   # only the new one
        assert done[("ann_index", None)]["n"].value == 15

        shutil.rmtree(root / "shard0")
        gone = tick(added.cursor)
        assert [(type(r).__name__, r.partition_keys) for r in gone.dynamic_partitions_requests] == [
            ("DeleteDynamicPartitionsRequest", ["shard0"])]
        assert len(gone.run_requests) == 1 and gone.run_requests[0].tags["pailitao/shards_removed"] == "shard0"


def test_only_new_shards_are_validated_and_a_bad_one_is_refused_alone(sharded):
    from pailitao.stages.data import ValidationFailed, check_raw_catalog, raw_catalog, validated_catalog

    params, root = sharded
    raw_catalog(params)
    first = validated_catalog(params)
    bad = write_shard(root, "shard2", n_items=4, seed=3)
    for png in (bad / "img").iterdir():
        png.write_text("not an image\n")   # every image quarantined: above validation.quarantine_max_share
    raw_catalog(params)
    assert all(o.passed or o.severity != "error" for o in check_raw_catalog(params, ["shard0", "shard1"]))
    failed = [o.name for o in check_raw_catalog(params, ["shard2"]) if not o.passed and o.severity == "error"]
    assert failed and failed == [o.name for o in check_raw_catalog(params) if not o.passed and o.severity == "error"]
    with pytest.raises(ValidationFailed, match="catalog shard 'shard2' validation failed"):
        validated_catalog(params)
    kept = Catalog.load(Paths.from_params(params).asset("validated_catalog"))   # the last good version stays
    assert kept.shards == ["shard0", "shard1"] and kept.meta["fingerprint"] == first.info["fingerprint"]
    shutil.rmtree(bad)
    raw_catalog(params)
    again = validated_catalog(params)
    assert again.info["shards_built"] == "(none: all up to date)" and again.metrics["checks_passed"] == 0
    stricter = deep_merge(params, {"validation": {"quarantine_max_share": 0.01}})
    raw_catalog(stricter)
    assert validated_catalog(stricter).info["shards_built"] == "shard0,shard1"   # the rules changed


def test_a_new_shard_adds_its_rows_to_the_current_index_and_a_removal_rebuilds(sharded):
    """ann_index.incremental: the new version is the current index plus the new rows (kept rows
    checked unchanged); the same search results as a rebuild; a removed shard rebuilds."""
    from retrieval import index_store
    from retrieval.index import build_index

    params, root = sharded
    paths = Paths.from_params(params)
    assert _update(params)["ann_index"]["build"] == "rebuilt"
    write_shard(root, "shard2", n_items=3, seed=3)
    grown = _update(params)["ann_index"]
    assert grown["build"] == "added 3 rows to 12" and grown["n"] == 15 and grown["recall_ok"]
    emb = np.load(paths.asset("item_embeddings") / "embeddings.npy")
    image_ids = pd.read_parquet(paths.asset("item_embeddings") / "items.parquet")["image_id"].astype(str).to_numpy()
    added = index_store.load_current(paths.asset("ann_index"))
    assert sorted(map(str, added.ids)) == sorted(image_ids)
    rebuilt = build_index(emb)
    for q in emb[:5]:   # the grown index ranks like a rebuilt one
        got = added.search(q[None], 5)[1][0]
        want = image_ids[rebuilt.search(q[None], 5)[1][0]]
        assert list(map(str, got))[:1] == list(want)[:1]
    shutil.rmtree(root / "shard0")
    assert _update(params)["ann_index"]["build"] == "rebuilt"
    off = deep_merge(params, {"ann_index": {"incremental": False}})
    write_shard(root, "shard3", n_items=2, seed=4)
    assert _update(off)["ann_index"]["build"] == "rebuilt"
