"""ANN index: recall per kind on clustered data, choice by size, atomic versioned publish under
concurrent readers (a thread and a separate process), clear errors, corrupt versions never served."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from core.gpu import faiss_gpu_available
from retrieval import index as ix, index_store

REPO = Path(__file__).resolve().parents[1]
# Recall@10 (items as queries) the defaults reach on this data; the documented floor per kind.
FLOOR = {"flat": 1.0, "hnsw": 0.99, "ivfpq": 0.95, "ivfpq_flat_refine": 0.99}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """faiss's OpenMP threads spin; on a shared 2-core box two of them run several times slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    return ix.clustered_embeddings(20_000, 64, clusters=400, seed=0)  # ~50 items per instance


@pytest.fixture(scope="module")
def ivfpq(emb):
    return ix.build_index(emb, None, {"kind": "ivfpq"})


def small(n: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return ix.clustered_embeddings(n, dim, clusters=50, seed=seed), np.array([f"item{i}" for i in range(n)])


def test_choose_kind_by_size():
    assert ix.choose_kind(1_000, 512) == "flat"
    assert ix.choose_kind(49_999, 512) == "flat"
    assert ix.choose_kind(50_000, 512) == "hnsw"
    assert ix.choose_kind(249_999, 512) == "hnsw"
    assert ix.choose_kind(1_000_000, 512) == "ivfpq"
    assert ix.choose_kind(10, 8, {"kind": "hnsw"}) == "hnsw"
    assert ix.choose_kind(200, 8, {"exact_below": 100, "hnsw_below": 150}) == "ivfpq"
    p = ix.ivfpq_params(1_000_000, 512)
    assert (p["nlist"], p["m"], p["train_size"]) == (4096, 64, 163_840)
    assert ix.ivfpq_params(20_000, 64)["nlist"] == 512  # capped at N/39


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_recall_flat_hnsw(emb, kind):
    index = ix.build_index(emb, None, {"kind": kind})
    assert ix.index_kind(index) == kind
    assert ix.recall_at_k(index, emb, k=10, sample=500) >= FLOOR[kind]


def test_recall_ivfpq(emb, ivfpq):
    assert ix.index_kind(ivfpq) == "ivfpq"
    assert ix.recall_at_k(ivfpq, emb, k=10, sample=500) >= FLOOR["ivfpq"]
    # PQ codes alone (the refine step's base) rank far worse: why refine is on by default
    base = faiss.downcast_index(faiss.downcast_index(ivfpq).base_index)
    assert ix.recall_at_k(base, emb, k=10, sample=500) < 0.9
    flat_refine = ix.build_index(emb, None, {"kind": "ivfpq", "ivfpq": {"refine": "flat"}})
    assert ix.recall_at_k(flat_refine, emb, k=10, sample=500) >= FLOOR["ivfpq_flat_refine"]


def test_search_returns_item_ids(emb, ivfpq, tmp_path):
    ids = np.array([f"sku-{i}" for i in range(len(emb))])
    index_store.publish(tmp_path, ivfpq, ids, {"model_version": "m1"})
    loaded = index_store.load_current(tmp_path)
    assert loaded.meta["search_params"] == {"k_factor": 8.0, "nprobe": 16}  # survive the round trip
    scores, got = loaded.search(emb[[3, 17]], k=5)
    assert list(got[:, 0]) == ["sku-3", "sku-17"] and np.allclose(scores[:, 0], 1, atol=1e-2)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    e, i = small(3)
    scores, got = ix.search(ix.build_index(e, None, {"kind": "flat"}), i, e[:1], k=5)  # k > N
    assert list(got[0, 3:]) == ["", ""] and np.isneginf(scores[0, 3:]).all()


def test_build_and_publish_gates_on_recall(tmp_path):
    e, i = small(2_000)
    meta = index_store.build_and_publish(tmp_path, e, i, {"recall_sample": 200}, model_version="emb@3")
    assert meta["recall"] == 1.0 and meta["recall_ok"] and meta["kind"] == "flat"
    assert meta["model_version"] == "emb@3" and meta["n"] == 2_000 and meta["dim"] == 16
    assert meta["bytes"] == sum(meta["files"].values()) > 2_000 * 16 * 4 and meta["build_seconds"] >= 0
    assert index_store.current_version(tmp_path) == meta["version"]
    bad = index_store.build_and_publish(tmp_path, e, i, {"recall_sample": 200, "min_recall": 1.01})
    assert not bad["recall_ok"] and bad["version"] in index_store.versions(tmp_path)
    assert index_store.current_version(tmp_path) == meta["version"]  # a failing index is kept, not served


def test_a_catalog_smaller_than_a_pq_codebook_gets_a_flat_index(tmp_path):
    e, i = small(100)   # < 2**nbits vectors: IVF-PQ settings must not even be computed
    meta = index_store.build_and_publish(tmp_path, e, i, {"recall_sample": 50})
    assert meta["kind"] == "flat" and meta["params"] == {} and meta["recall_ok"]


def _check_complete(loaded) -> str:
    index, ids, meta = loaded
    assert meta["n"] == len(ids) == index.ntotal and meta["dim"] == index.d
    assert ids[-1] == f"item{meta['n'] - 1}"  # the ids belong to this version
    return meta["version"]


READER_PROCESS = """
import json, os, sys, time
from retrieval import index_store
root, stop = sys.argv[1], sys.argv[2]
seen, errors, loads = [], [], 0
while not os.path.exists(stop):
    try:
        index, ids, meta = index_store.load_current(root)
        assert meta["n"] == len(ids) == index.ntotal, (meta["n"], len(ids), index.ntotal)
        assert ids[-1] == f"item{meta['n'] - 1}"
        loads += 1
        if not seen or seen[-1] != meta["version"]:
            seen.append(meta["version"])
    except Exception as e:
        errors.append(repr(e))
print(json.dumps({"loads": loads, "seen": seen, "errors": errors[:5]}))
"""


def test_atomic_publish_under_concurrent_readers(tmp_path):
    e, i = small(4_000)
    first = index_store.publish(tmp_path, ix.build_index(e[:500], None, {"kind": "flat"}), i[:500], keep=2).name
    stop = tmp_path / "STOP"
    proc = subprocess.Popen([sys.executable, "-c", READER_PROCESS, str(tmp_path), str(stop)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    reader, seen, errors, done = index_store.IndexReader(tmp_path, use_gpu=False), [], [], threading.Event()

    def poll():
        while not done.is_set():
            try:
                v = _check_complete(reader.get())
                if not seen or seen[-1] != v:
                    seen.append(v)
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(repr(exc))

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(1.5)  # the process has imported faiss and is polling
    published = []
    for n in (1_000, 3_000, 1_500, 4_000, 2_000, 2_500, 3_500, 1_200):
        published.append(index_store.publish(tmp_path, ix.build_index(e[:n], None, {"kind": "flat"}), i[:n],
                                             keep=2).name)
        time.sleep(0.1)
    time.sleep(0.5)
    done.set()
    t.join()
    stop.touch()
    out = json.loads(proc.communicate(timeout=30)[0])
    assert errors == [] and out["errors"] == []
    assert len(seen) >= 3 and set(seen) | set(out["seen"]) <= {first, *published}
    assert out["loads"] > 10 and len(out["seen"]) >= 2 and seen[-1] == out["seen"][-1] == published[-1]
    assert len(index_store.versions(tmp_path)) == 2  # keep=2: old versions are cleaned up


def test_reader_caches_and_swaps(tmp_path):
    e, i = small(1_000)
    index_store.publish(tmp_path, ix.build_index(e[:600], None, {"kind": "flat"}), i[:600])
    reader = index_store.IndexReader(tmp_path, use_gpu=False)
    first = reader.get()
    assert reader.get() is first  # unchanged pointer: no reload
    index_store.publish(tmp_path, ix.build_index(e, None, {"kind": "flat"}), i)
    second = reader.get()
    assert second is not first and second.meta["n"] == 1_000
    assert first.search(e[:2], 3)[1].shape == (2, 3)  # an in-flight holder of the old version still works
    assert reader.search(e[999:], 1)[1][0, 0] == "item999"


def test_cleanup_keeps_current_and_previous(tmp_path):
    e, i = small(300)
    index = ix.build_index(e, None, {"kind": "flat"})
    names = [index_store.publish(tmp_path, index, i, keep=1).name for _ in range(4)]
    assert index_store.versions(tmp_path) == names[-2:]
    index_store.set_current(tmp_path, names[-2])  # rollback
    index_store.cleanup(tmp_path, keep=1)
    assert index_store.versions(tmp_path) == names[-2:]  # the newest is kept by keep=1, the current by rule
    assert index_store.current_version(tmp_path) == names[-2]


def test_bad_inputs(tmp_path):
    e, i = small(300)
    with pytest.raises(ValueError, match="non-empty"):
        ix.build_index(np.zeros((0, 16), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        ix.build_index(np.where(np.arange(300)[:, None] == 7, np.nan, e))
    with pytest.raises(ValueError, match="L2-normalised"):
        ix.build_index(e * 2)
    with pytest.raises(ValueError, match="one id per vector"):
        ix.build_index(e, i[:-1])
    with pytest.raises(ValueError, match="not unique"):
        ix.build_index(e, np.zeros(300, int))
    with pytest.raises(ValueError, match="kind"):
        ix.build_index(e, i, {"kind": "lsh"})
    with pytest.raises(ValueError, match="unknown ann_index.hnsw"):
        ix.resolve_cfg({"hnsw": {"efSearch": 10}})
    with pytest.raises(ValueError, match="must divide"):
        ix.build_index(e, i, {"kind": "ivfpq", "ivfpq": {"m": 5}})
    index = ix.build_index(e, i, {"kind": "flat"})
    with pytest.raises(ValueError, match="dimension 8, the index has 16"):
        ix.search(index, i, e[:2, :8] / np.linalg.norm(e[:2, :8], axis=1, keepdims=True))
    with pytest.raises(ValueError, match="index holds 300 vectors"):
        ix.recall_at_k(index, e[:100])
    with pytest.raises(FileNotFoundError, match="no published index"):
        index_store.load_current(tmp_path)
    with pytest.raises(FileNotFoundError, match="no published index"):
        index_store.IndexReader(tmp_path).get()


def test_corrupt_or_partial_version_never_current(tmp_path):
    e, i = small(500)
    index = ix.build_index(e, None, {"kind": "flat"})
    good = index_store.publish(tmp_path, index, i).name
    # a writer that dies mid-write (meta not serialisable, after index and ids were written)
    with pytest.raises(TypeError):
        index_store.publish(tmp_path, index, i, {"oops": object()})
    assert index_store.versions(tmp_path) == [good] and not list((tmp_path / "versions").glob(".tmp-*"))
    # leftovers of a writer killed hard: a temp dir, a dir without meta.json; neither is a version to serve
    (tmp_path / "versions" / ".tmp-x").mkdir()
    (tmp_path / "versions" / ".tmp-x" / "index.faiss").write_bytes(b"half")
    (tmp_path / "versions" / "zz-no-meta").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        index_store.set_current(tmp_path, "zz-no-meta")
    # a complete version whose index file is later truncated
    bad = index_store.publish(tmp_path, index, i, make_current=False)
    with open(bad / "index.faiss", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        index_store.set_current(tmp_path, bad.name)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt .*meta.json"):
        index_store.load_version(tmp_path, bad.name)
    assert index_store.current_version(tmp_path) == good and _check_complete(index_store.load_current(tmp_path)) == good
    (tmp_path / "CURRENT").write_text("\n")
    with pytest.raises(ValueError, match="no valid version name"):
        index_store.load_current(tmp_path)


@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss-gpu and a GPU")
def test_gpu_build_and_serve(emb, tmp_path):
    index = ix.build_index(emb, None, {"kind": "ivfpq", "use_gpu": True})
    assert not ix.is_gpu_index(index) and ix.recall_at_k(index, emb, use_gpu=True) >= FLOOR["ivfpq"]
    index_store.publish(tmp_path, index, np.arange(len(emb)))
    loaded = index_store.IndexReader(tmp_path, use_gpu=True).get()
    assert ix.is_gpu_index(loaded.index)
    assert ix.recall_at_k(loaded.index, emb) >= FLOOR["ivfpq"]
    assert loaded.search(emb[:4], 1)[1][:, 0].tolist() == [0, 1, 2, 3]
