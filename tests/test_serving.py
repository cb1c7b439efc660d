"""The search service on the tiny lineage: happy path, every 4xx, overload and timeouts answered
503 quickly, a newly published index swapped in under load without failing requests in flight."""
import io
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from data.schema import Catalog
from evaluation.retrieval import gallery
from core.config import Paths, deep_merge
from retrieval import index_store
from retrieval import pipeline as pl
from retrieval import query as rq
from serving.ab import EventLog
from serving.app import create_app
from tests.conftest import LiveServer, plant_bad_image
from tests.conftest import image_bytes as encode



@pytest.fixture(scope="module")
def searcher(tiny_lineage):
    return pl.build_searcher(tiny_lineage)


@pytest.fixture(scope="module")
def first(tiny_lineage):
    catalog = Catalog.load(Paths.from_params(tiny_lineage).asset("validated_catalog"))
    row = gallery(catalog).iloc[0]
    return {**row.to_dict(), "bytes": catalog.image_file(row["path"]).read_bytes()}


def app_with(params, searcher, tmp_path, **serving):
    params = deep_merge(params, {"serving": serving})
    return create_app(params, {"default": searcher}, EventLog(tmp_path / "events.sqlite"))


@pytest.fixture
def client(tiny_lineage, searcher, tmp_path):
    small = pl.Searcher(searcher.embedder, searcher.model, searcher.index_dir, searcher.embeddings_dir,
                        searcher.dim, rq.QueryLimits(max_bytes=50_000))
    small.refresh()
    with TestClient(app_with(tiny_lineage, small, tmp_path)) as c:
        yield c


def slow(seconds):
    def rerank(query, cands):
        time.sleep(seconds)
        return cands
    return rerank


def test_search_happy_path_items_images_health_metrics(client, first):
    r = client.post("/search", files={"image": ("q.png", first["bytes"], "image/png")},
                    data={"text": first["title"], "k": "4"}, headers={"X-Session-Id": "s1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["X-Request-Id"] == body["request_id"] == body["query_id"]
    assert body["variant"] == "default" and len(body["results"]) == 4
    top = body["results"][0]
    assert top["item_id"] == first["item_id"] and top["title"] == first["title"] and top["rank"] == 1
    assert set(body["latency_ms"]) == {"decode", "embed", "ann", "rerank", "total"}
    assert client.post("/search", data={"text": "striped sneaker"}).json()["results"]

    item = client.get(f"/items/{first['item_id']}").json()
    assert item["title"] == first["title"] and first["image_id"] in item["image_ids"]
    thumb = client.get(f"/images/{top['image_id']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "max-age" in thumb.headers["cache-control"] and thumb.headers["etag"]
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 192
    assert client.get(f"/images/{first['item_id']}").content == thumb.content   # an item id: its image
    assert client.get("/images/x?size=64").status_code == 404

    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["variants"]["default"]["ready"]
    click = client.post("/click", json={"request_id": body["request_id"], "item_id": top["item_id"]})
    assert click.status_code == 200 and click.json()["position"] == 0
    metrics = client.get("/metrics").text
    assert 'pailitao_search_stage_seconds_bucket{le="0.05",stage="embed",variant="default"}' in metrics
    assert 'pailitao_requests_total{endpoint="/search",status="200"} 2.0' in metrics
    assert "pailitao_searches_admitted" in metrics
    page = client.get("/")
    assert page.status_code == 200 and 'id="image-input"' in page.text
    assert client.get("/static/app.js").status_code == 200


def _bad(kind: str) -> bytes:
    """The bytes of a planted bad image (the ingest tests' kinds)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.png"
        plant_bad_image(path, kind, Image.new("RGB", (64, 48), "red"))
        return path.read_bytes()


@pytest.mark.parametrize("files, data, status, code", [
    ({"image": ("a.txt", b"just some text", "text/plain")}, {}, 415, "unsupported_image"),
    ({"image": ("a.tif", encode(Image.new("RGB", (40, 40)), "TIFF"), "image/tiff")}, {}, 415, "unsupported_image"),
    ({"image": ("a.png", _bad("truncated"), "image/png")}, {}, 400, "corrupt_image"),
    ({"image": ("a.png", _bad("bomb"), "image/png")}, {}, 413, "too_large"),                  # pixels
    ({"image": ("a.png", np.random.default_rng(0).bytes(60_000), "image/png")}, {}, 413, "too_large"),   # bytes
    ({"image": ("a.png", b"\0" * 400_000, "image/png")}, {}, 413, "too_large"),               # body
    ({"image": ("a.png", encode(Image.new("RGB", (4, 40))), "image/png")}, {}, 400, "unusable_image"),
    (None, {}, 422, "empty_query"),
    ({"image": ("", b"", "application/octet-stream")}, {"text": "  "}, 422, "empty_query"),   # empty form of the page
    (None, {"text": "mug", "k": "0"}, 400, "bad_request"),
    (None, {"text": "x" * 600}, 413, "too_large"),
])
def test_bad_requests_get_clear_4xx_json(client, files, data, status, code):
    r = client.post("/search", files=files, data=data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["status"] == status and err["message"]


def test_unknown_things_are_404(client):
    assert client.get("/items/no-such-item").json()["error"]["code"] == "unknown_item"
    assert client.get("/items/no-such-item").status_code == 404
    assert client.get("/images/no-such-image").status_code == 404
    r = client.post("/click", json={"request_id": "nope", "item_id": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_impression"
    assert client.post("/click", content=b"not json").status_code == 400


def test_not_ready_is_503(tiny_lineage, searcher, tmp_path):
    empty = pl.Searcher(searcher.embedder, searcher.model, tmp_path / "none", searcher.embeddings_dir, searcher.dim)
    with TestClient(create_app(tiny_lineage, {"default": empty}, EventLog(tmp_path / "e.sqlite"))) as c:
        assert c.get("/healthz").status_code == 503
        r = c.post("/search", data={"text": "mug"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_overload_is_refused_at_once_and_timeouts_are_503(tiny_lineage, searcher, tmp_path):
    busy = pl.build_searcher(tiny_lineage, reranker=slow(1.5), embedder=searcher.embedder, info=searcher.model)
    app = app_with(tiny_lineage, busy, tmp_path, concurrency=1, queue=0, timeout_s=5.0)
    with LiveServer(app) as srv:
        results = []

        def call():
            t0 = time.perf_counter()
            r = httpx.post(srv.url + "/search", data={"text": "mug"}, timeout=10)
            results.append((r.status_code, r.json(), time.perf_counter() - t0))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for i, t in enumerate(threads):
            t.start()
            if i == 0:
                time.sleep(0.3)   # the first one holds the only slot
        for t in threads:
            t.join()
    codes = sorted(c for c, _, _ in results)
    assert codes == [200, 503, 503, 503], results
    refused = [(b, s) for c, b, s in results if c == 503]
    assert all(b["error"]["code"] == "overloaded" and s < 1.0 for b, s in refused), refused

    app = app_with(tiny_lineage, busy, tmp_path, concurrency=1, queue=1, timeout_s=0.5)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        t0 = time.perf_counter()
        r = c.post("/search", data={"text": "mug"})
        took = time.perf_counter() - t0
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout" and 0.5 <= took < 1.2
        metrics = c.get("/metrics").text
    assert 'pailitao_rejected_total{reason="timeout"} 1.0' in metrics
    assert 'pailitao_requests_total{endpoint="/search",status="503"} 1.0' in metrics


def test_new_index_is_picked_up_while_requests_are_in_flight(tiny_lineage, searcher, tmp_path):
    emb_dir = searcher.embeddings_dir
    emb = np.load(emb_dir / "embeddings.npy")
    ids = pd.read_parquet(emb_dir / "items.parquet")["image_id"].to_numpy()
    root = tmp_path / "ann_index"
    cfg = {"recall_sample": 50}
    v1 = index_store.build_and_publish(root, emb, ids, cfg, model_version=searcher.model.fingerprint)["version"]
    live = pl.Searcher(searcher.embedder, searcher.model, root, emb_dir, searcher.dim, reranker=slow(0.5))
    live.refresh()
    app = app_with(tiny_lineage, live, tmp_path, concurrency=4, queue=16, timeout_s=10, reload_seconds=0.05)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        stop, seen, failures = threading.Event(), [], []

        def hammer():
            while not stop.is_set():
                r = httpx.post(srv.url + "/search", data={"text": "mug"}, timeout=20)
                (seen if r.status_code == 200 else failures).append(r.json().get("index_version", r.text))

        load = [threading.Thread(target=hammer) for _ in range(2)]
        for t in load:
            t.start()
        in_flight = {}
        early = threading.Thread(target=lambda: in_flight.update(r=c.post("/search", data={"text": "cap"})))
        early.start()
        time.sleep(0.2)                       # `early` is in the pipeline, on v1
        v2 = index_store.build_and_publish(root, emb, ids, cfg,
                                           model_version=searcher.model.fingerprint)["version"]
        deadline = time.monotonic() + 5
        while c.get("/healthz").json()["variants"]["default"]["index_version"] != v2:
            assert time.monotonic() < deadline, "new index not picked up"
            time.sleep(0.02)
        early.join()
        assert in_flight["r"].status_code == 200 and in_flight["r"].json()["index_version"] == v1
        assert c.post("/search", data={"text": "cap"}).json()["index_version"] == v2
        # an index built by another model is refused: v2 keeps serving, health says why
        index_store.build_and_publish(root, emb, ids, cfg, model_version="someone-else")
        time.sleep(0.3)
        health = c.get("/healthz").json()["variants"]["default"]
        assert health["index_version"] == v2 and "built by model someone-else" in health["error"]
        assert c.post("/search", data={"text": "cap"}).json()["index_version"] == v2
        stop.set()
        for t in load:
            t.join()
    assert not failures, failures[:3]
    assert {v1, v2} <= set(seen)
