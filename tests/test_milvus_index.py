"""ann_index.backend milvus on milvus-lite (a .db under tmp_path): build, publish, load and search
equal exact search; the recall gate; publishing while a thread searches (no errors, no torn reads);
hot reload; collections dropped with their versions (and after a killed publisher); the Searcher
and the service unchanged on a milvus-backed index of the tiny lineage."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import faiss
import numpy as np
import pytest

from core.config import Paths, deep_merge
from retrieval import index as ix, index_store, milvus_index as mi

pytest.importorskip("milvus_lite")

N, DIM = 2_000, 32
MILVUS = {"backend": "milvus", "recall_sample": 300, "use_gpu": False}


def data(n: int = N, seed: int = 0, tag: str = "item"):
    return ix.clustered_embeddings(n, DIM, clusters=60, seed=seed), np.array([f"{tag}{j}" for j in range(n)])


def collections(root) -> set[str]:
    return set(mi.client(mi.resolve_uri("milvus.db", root)).list_collections())


def test_build_publish_load_search_equals_exact(tmp_path):
    root = tmp_path / "idx"
    e, ids = data()
    meta = index_store.build_and_publish(root, e, ids, MILVUS, model_version="m1")
    assert meta["backend"] == "milvus" and meta["kind"] == "milvus-flat" and meta["uri"] == "milvus.db"
    assert meta["n"] == N and meta["dim"] == DIM and meta["recall"] == 1.0 and meta["recall_ok"]
    assert meta["collection"] == f"pailitao_items_{meta['version'].replace('-', '_')}"
    vdir = root / "versions" / meta["version"]
    assert sorted(p.name for p in vdir.iterdir()) == ["ids.npy", "meta.json", "milvus.json"]   # no index.faiss
    assert (root / "milvus.db").is_dir() and index_store.current_version(root) == meta["version"]
    c = mi.client(mi.resolve_uri("milvus.db", root))
    assert c.describe_alias("pailitao_items")["collection_name"] == meta["collection"]

    loaded = index_store.load_current(root)
    assert isinstance(loaded.index, mi.MilvusIndex) and loaded.index.ntotal == N and loaded.index.d == DIM
    q = e[::37] + 0.05 * np.random.default_rng(1).standard_normal((len(e[::37]), DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact_d, exact_i = faiss.knn(q, e, 10, metric=faiss.METRIC_INNER_PRODUCT)
    scores, got = loaded.search(q, 10)
    assert (got == ids[exact_i]).all()
    np.testing.assert_allclose(scores, exact_d, atol=1e-4)
    scores, got = loaded.search(q[:2], N + 5)   # past ntotal: padded like faiss
    assert (got[:, N:] == "").all() and np.isneginf(scores[:, N:]).all() and (got[:, :N] != "").all()
    assert ix.recall_at_k(loaded.index, e, 10, 200, use_gpu=False) == 1.0   # any object with .search


def test_recall_gate_keeps_a_bad_version_off_current(tmp_path):
    root = tmp_path / "idx"
    e, ids = data()
    good = index_store.build_and_publish(root, e, ids, MILVUS)
    bad = index_store.build_and_publish(root, e, ids, {**MILVUS, "min_recall": 1.01})
    assert bad["recall"] == 1.0 and bad["min_recall"] == 1.01 and not bad["recall_ok"]
    assert (root / "versions" / bad["version"] / "meta.json").is_file()   # kept for inspection
    assert index_store.current_version(root) == good["version"]
    c = mi.client(mi.resolve_uri("milvus.db", root))
    assert c.describe_alias("pailitao_items")["collection_name"] == good["collection"]   # alias not moved
    index_store.set_current(root, bad["version"])   # a manual rollout moves both
    assert c.describe_alias("pailitao_items")["collection_name"] == bad["collection"]
    assert index_store.load_current(root).search(e[:1], 1)[1][0, 0] == "item0"


def test_publish_while_searching_no_errors_no_torn_reads(tmp_path):
    """Each version holds other vectors under other ids (tag a_, b_, ...). A reader thread searches
    whatever IndexReader serves: an item's own vector must come back as that version's own id, and a
    fixed probe's neighbours must all carry one tag: a mix would be a torn read."""
    root = tmp_path / "idx"
    tags = ["a_", "b_", "c_", "d_", "e_"]
    sets = {t: data(n, seed=s, tag=t) for s, (t, n) in enumerate(zip(tags, (1_500, 2_000, 1_200, 1_800, 1_000)))}
    probe = data(20, seed=99)[0]
    index_store.build_and_publish(root, *sets["a_"], {**MILVUS, "keep_versions": 2}, model_version="a_")
    reader, seen, errors, done = index_store.IndexReader(root, use_gpu=False), [], [], threading.Event()
    rows = np.array([0, 7, 999])
    searches = 0

    def poll():
        nonlocal searches
        while not done.is_set():
            try:
                loaded = reader.get()
                tag = loaded.meta["model_version"]
                if not seen or seen[-1] != tag:
                    seen.append(tag)
                e, ids = sets[tag]
                _, got = loaded.search(e[rows], 5)
                assert list(got[:, 0]) == list(ids[rows]), (tag, got[:, 0])
                _, got = loaded.search(probe, 10)
                assert {str(x)[:2] for x in got.ravel()} == {tag}, (tag, got)
                searches += 1
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(repr(exc))

    t = threading.Thread(target=poll)
    t.start()
    for tag in tags[1:]:
        index_store.build_and_publish(root, *sets[tag], {**MILVUS, "keep_versions": 2}, model_version=tag)
        time.sleep(0.2)
    time.sleep(0.3)
    done.set()
    t.join()
    assert errors == []
    assert searches > 20 and len(seen) >= 3 and set(seen) <= set(tags) and seen[-1] == "e_"
    assert seen == sorted(seen)   # never back to an older version
    vs = index_store.versions(root)
    assert len(vs) == 2   # keep 2: the older versions and their collections are gone
    assert collections(root) == {json.loads((root / "versions" / v / "meta.json").read_text())["collection"]
                                 for v in vs}


def test_index_reader_hot_reloads_and_the_old_version_still_answers(tmp_path):
    root = tmp_path / "idx"
    e, ids = data()
    index_store.build_and_publish(root, e[:1_200], ids[:1_200], MILVUS)
    reader = index_store.IndexReader(root, use_gpu="auto")   # no GPU copy for a Milvus index
    first = reader.get()
    assert reader.get() is first   # unchanged CURRENT: no reload
    index_store.build_and_publish(root, e, ids, MILVUS)
    second = reader.get()
    assert second is not first and second.meta["n"] == N and isinstance(second.index, mi.MilvusIndex)
    assert first.search(e[:2], 3)[1].shape == (2, 3)   # an in-flight holder of the previous version
    assert reader.search(e[N - 1:], 1)[1][0, 0] == f"item{N - 1}"


def test_cleanup_drops_collections_also_of_a_killed_publisher(tmp_path):
    root = tmp_path / "idx"
    e, ids = data(600)
    cfg = {**MILVUS, "keep_versions": 1}
    index_store.build_and_publish(root, e, ids, cfg)
    # a publisher killed after creating its collection: its temp directory names the collection
    c = mi.client(mi.resolve_uri("milvus.db", root))
    c.create_collection("pailitao_items_orphan", dimension=DIM, metric_type="IP")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = root / "versions" / f".tmp-20000101T000000000000Z-dead00-{dead.pid}@{socket.gethostname()}"
    tmp.mkdir()
    (tmp / "milvus.json").write_text(json.dumps({"uri": "milvus.db", "collection": "pailitao_items_orphan",
                                                 "alias": "pailitao_items"}))
    for _ in range(3):
        index_store.build_and_publish(root, e, ids, cfg)
    vs = index_store.versions(root)
    assert len(vs) == 2 and not tmp.exists()   # keep 1 + the previous one (protected)
    assert collections(root) == {json.loads((root / "versions" / v / "meta.json").read_text())["collection"]
                                 for v in vs}


def test_uri_from_the_environment_and_clear_errors(tmp_path, monkeypatch):
    e, ids = data(300)
    monkeypatch.setenv(mi.ENV_URI, str(tmp_path / "elsewhere" / "shared.db"))
    meta = index_store.build_and_publish(tmp_path / "idx", e, ids, MILVUS)
    assert meta["uri"] == str(tmp_path / "elsewhere" / "shared.db") and (tmp_path / "elsewhere" / "shared.db").is_dir()
    assert not (tmp_path / "idx" / "milvus.db").exists()
    monkeypatch.delenv(mi.ENV_URI)
    assert index_store.load_current(tmp_path / "idx").index.ntotal == 300   # meta.json's uri
    assert mi.redact("https://user:secret@milvus.example:19530/db1") == "https://milvus.example:19530/db1"
    with pytest.raises(ValueError, match="ending in .db"):
        index_store.build_and_publish(tmp_path / "idx2", e, ids, {**MILVUS, "milvus": {"uri": "milvus.sqlite"}})
    with pytest.raises(ValueError, match="collection_prefix"):
        index_store.build_and_publish(tmp_path / "idx2", e, ids, {**MILVUS, "milvus": {"collection_prefix": "a-b"}})
    with pytest.raises(ValueError, match="backend must be faiss or milvus"):
        ix.resolve_cfg({"backend": "qdrant"})
    with pytest.raises(ValueError, match=r"unknown ann_index.milvus settings \['urls'\]"):
        ix.resolve_cfg({"milvus": {"urls": "x.db"}})


# ---------------------------------------------------------------- the lineage's Searcher and service
@pytest.fixture(scope="module")
def milvus_lineage(tiny_lineage, tmp_path_factory):
    """tiny_lineage's item_embeddings published by the ann_index stage on the milvus backend into a
    directory of its own (the lineage's faiss index stays as it is)."""
    from pailitao.stages.retrieval import ann_index

    params = deep_merge(tiny_lineage, {"ann_index": {"backend": "milvus"}})
    out = tmp_path_factory.mktemp("milvus_ann_index") / "ann_index"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", params["mlflow"]["tracking_uri"])
        res = ann_index(params, embeddings=Paths.from_params(params).asset("item_embeddings"), out=out)
    return params, out, res


def test_searcher_and_service_work_unchanged_on_milvus(milvus_lineage, tmp_path):
    from fastapi.testclient import TestClient

    from data.schema import Catalog
    from evaluation.retrieval import gallery
    from pailitao.stages.retrieval import check_ann_index
    from retrieval import pipeline as pl
    from serving.ab import EventLog
    from serving.app import create_app

    params, out, res = milvus_lineage
    assert res.info["kind"] == "milvus-flat" and res.info["recall_ok"] and res.metrics["recall"] == 1.0
    passed, desc, _ = check_ann_index(params, out)   # the blocking asset check reads the same meta.json
    assert passed and "milvus-flat" in desc
    on_faiss = pl.build_searcher(params, reranker=None)   # the lineage's faiss index
    on_milvus = pl.build_searcher(params, index_dir=out, reranker=None, embedder=on_faiss.embedder,
                                  info=on_faiss.model)
    assert on_milvus.ready and on_milvus.status()["kind"] == "milvus-flat" and on_milvus.last_error is None
    assert isinstance(on_milvus.snapshot().loaded.index, mi.MilvusIndex)

    catalog = Catalog.load(Paths.from_params(params).asset("validated_catalog"))
    rows = gallery(catalog).iloc[:3]
    for i, row in rows.iterrows():
        image = catalog.image_file(row["path"]).read_bytes()
        for text in (row["title"], None):
            a, b = on_faiss.search(image=image, text=text, k=5), on_milvus.search(image=image, text=text, k=5)
            assert [c.item_id for c in b.results] == [c.item_id for c in a.results]
            np.testing.assert_allclose([c.score for c in b.results], [c.score for c in a.results], atol=1e-4)
    row = rows.iloc[0]
    image = catalog.image_file(row["path"]).read_bytes()
    assert on_milvus.search(image=image, text=row["title"], k=3).results[0].item_id == row["item_id"]

    app = create_app(params, {"default": on_milvus}, EventLog(tmp_path / "events.sqlite"))
    with TestClient(app) as client:
        r = client.post("/search", files={"image": ("q.png", image, "image/png")},
                        data={"text": row["title"], "k": "3"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["item_id"] == row["item_id"]
        assert client.post("/search", data={"text": row["title"]}).status_code == 200
        assert client.get("/healthz").status_code == 200
