"""The search service under faults, on a real app over the tiny lineage: bad query parameters, one
JSON error shape (with a request id) for every error status, clients that hang up or stall
mid-upload, the concurrent-upload cap, errors counted per route, and duplicate clicks."""
import json
import logging
import socket
import sqlite3
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pailitao.stages.evaluation import online_ab
from core.config import deep_merge
from retrieval import pipeline as pl
from serving.ab import EventLog
from serving.app import create_app
from tests.conftest import LiveServer

BOUNDARY = "fault-boundary"


@pytest.fixture(scope="module")
def searcher(tiny_lineage):
    return pl.build_searcher(tiny_lineage)


def make_app(params, searcher, tmp_path, **serving):
    return create_app(deep_merge(params, {"serving": serving}), {"default": searcher},
                      EventLog(tmp_path / "events.sqlite"), start_reloader=False)


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def assert_error(r, status: int, code: str) -> dict:
    """The one error shape: {"error": {status, code, message, request_id}} + the X-Request-Id header."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"status", "code", "message", "request_id"} and err["message"]
    assert err["status"] == status and err["code"] == code, err
    assert err["request_id"] and err["request_id"] == r.headers["x-request-id"]
    return err


def stalled_upload(port: int, sent: int = 200, total: int = 50_000) -> socket.socket:
    """A raw client that sends the headers and `sent` bytes of a `total`-byte multipart body, then stalls."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {total}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    s.sendall(head + (part + b"\0" * sent)[:sent])
    return s


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers, body of the one response on `s`, read until the server closes it."""
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_thumbnail_size_is_validated_and_every_error_has_one_shape(tiny_lineage, searcher, tmp_path):
    app = make_app(tiny_lineage, searcher, tmp_path)

    @app.get("/probe/int")        # a typed parameter: FastAPI's own validation (RequestValidationError)
    def probe_int(n: int):
        return {"n": n}

    @app.get("/probe/boom")       # a bug in a handler: an unhandled exception
    def probe_boom():
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as c:
        image_id = str(searcher.snapshot().loaded.ids[0])
        assert c.get(f"/images/{image_id}?size=64").status_code == 200
        for size in ("-5", "0", "abc", "1.5", "1025"):
            err = assert_error(c.get(f"/images/{image_id}?size={size}"), 422, "invalid_parameter")
            assert "size" in err["message"] and "1..1024" in err["message"], err
        assert "n" in assert_error(c.get("/probe/int?n=x"), 422, "invalid_parameter")["message"]
        assert_error(c.get("/probe/boom"), 500, "internal_error")
        assert_error(c.get("/items/no-such-item"), 404, "unknown_item")
        assert_error(c.get("/no/such/route"), 404, "not_found")
        assert_error(c.delete("/search"), 405, "method_not_allowed")
        assert_error(c.post("/search", files={"image": ("a.txt", b"text", "text/plain")}), 415, "unsupported_image")
        err = assert_error(c.post("/search", json={"text": "mug"}), 415, "unsupported_media_type")
        assert "multipart/form-data" in err["message"] and "image" in err["message"] and "text" in err["message"]
        ok = c.post("/search", data={"text": "mug"})
        assert ok.status_code == 200 and ok.json()["request_id"] == ok.headers["x-request-id"]
        assert c.get("/healthz").headers["x-request-id"] != ok.headers["x-request-id"]
        text = c.get("/metrics").text
    # every 4xx/5xx by route template, status and code, also the 500 (which never reached the old counter)
    for endpoint, status, code, n in [("/images/{image_id:path}", "422", "invalid_parameter", 5),
                                      ("/probe/int", "422", "invalid_parameter", 1),
                                      ("/probe/boom", "500", "internal_error", 1),
                                      ("/items/{item_id:path}", "404", "unknown_item", 1),
                                      ("unmatched", "404", "not_found", 1),
                                      ("/search", "405", "method_not_allowed", 1),
                                      ("/search", "415", "unsupported_image", 1),
                                      ("/search", "415", "unsupported_media_type", 1)]:
        assert metric(text, "pailitao_errors_total", endpoint=endpoint, status=status, code=code) == n, \
            (endpoint, status, code)
        assert metric(text, "pailitao_requests_total", endpoint=endpoint, status=status) == \
            metric(text, "pailitao_errors_total", endpoint=endpoint, status=status)
    assert metric(text, "pailitao_errors_total", status="200") == 0
    assert metric(text, "pailitao_requests_total", endpoint="/search", status="200") == 1


def test_not_ready_health_is_503_in_the_error_shape(tiny_lineage, searcher, tmp_path):
    empty = pl.Searcher(searcher.embedder, searcher.model, tmp_path / "none", searcher.embeddings_dir, searcher.dim)
    app = create_app(tiny_lineage, {"default": empty}, EventLog(tmp_path / "e.sqlite"), start_reloader=False)
    with TestClient(app) as c:
        r = c.get("/healthz")
        assert_error(r, 503, "not_ready")
        assert r.json()["status"] == "not_ready" and not r.json()["variants"]["default"]["ready"]
        assert_error(c.post("/search", data={"text": "mug"}), 503, "not_ready")


def test_client_hanging_up_mid_upload_is_one_log_line_and_counted(tiny_lineage, searcher, tmp_path, caplog):
    app = make_app(tiny_lineage, searcher, tmp_path)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(caplog.handler)    # uvicorn's loggers do not propagate to the root
        try:
            with caplog.at_level(logging.WARNING):
                for _ in range(20):
                    stalled_upload(srv.port).close()
                deadline = time.monotonic() + 10
                while metric(c.get("/metrics").text, "pailitao_client_disconnects_total", endpoint="/search") < 20:
                    assert time.monotonic() < deadline, c.get("/metrics").text
                    time.sleep(0.05)
        finally:
            uvicorn_log.removeHandler(caplog.handler)
        assert c.post("/search", data={"text": "mug"}).status_code == 200   # the server is fine
    hung_up = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert len(hung_up) == 20 and all(r.levelno == logging.WARNING and not r.exc_info for r in hung_up)
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


def test_stalled_upload_gets_408_and_the_connection_is_closed(tiny_lineage, searcher, tmp_path):
    app = make_app(tiny_lineage, searcher, tmp_path, body_read_timeout_s=0.5)
    with LiveServer(app) as srv:
        t0 = time.perf_counter()
        s = stalled_upload(srv.port)
        status, headers, body = read_response(s)   # returns only once the server closes the connection
        took = time.perf_counter() - t0
        s.close()
        assert status == 408 and 0.4 < took < 3, (status, took, body)
        err = json.loads(body)["error"]
        assert err["code"] == "body_timeout" and err["request_id"] == headers["x-request-id"]
        assert headers["connection"] == "close"
        text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "pailitao_errors_total", endpoint="/search", status="408", code="body_timeout") == 1


def test_uploads_over_the_cap_get_503_and_others_still_work(tiny_lineage, searcher, tmp_path):
    app = make_app(tiny_lineage, searcher, tmp_path, max_concurrent_uploads=1, body_read_timeout_s=3)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        slow = stalled_upload(srv.port)          # holds the only upload slot until its deadline
        deadline = time.monotonic() + 2.5
        while (r := c.post("/search", data={"text": "mug"})).status_code == 200:
            assert time.monotonic() < deadline, "the stalled upload never took the slot"
        assert_error(r, 503, "too_many_uploads")
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/healthz").status_code == 200 and c.get("/items/x").status_code == 404   # no body: no slot
        assert read_response(slow)[0] == 408     # its deadline frees the slot
        slow.close()
        assert c.post("/search", data={"text": "mug"}).status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "pailitao_errors_total", endpoint="/search", status="503", code="too_many_uploads") >= 1


def test_duplicate_clicks_count_once(tiny_lineage, searcher, tmp_path):
    app = make_app(tiny_lineage, searcher, tmp_path)
    with TestClient(app) as c:
        body = c.post("/search", data={"text": "mug", "k": "3"}).json()
        click = {"request_id": body["request_id"], "item_id": body["results"][1]["item_id"]}
        first, again = c.post("/click", json=click), c.post("/click", json=click)
        assert first.status_code == again.status_code == 200
        assert first.json()["duplicate"] is False and again.json() == {**first.json(), "duplicate": True}
        log = app.state.event_log
        assert len(log.read("clicks")) == 1
        # a log written before duplicates were refused (or by another process): analysis still counts once
        with sqlite3.connect(log.path) as db:
            db.execute("INSERT INTO clicks SELECT * FROM clicks")
            assert db.execute("SELECT COUNT(*) FROM clicks").fetchone()[0] == 2
        clicks = log.read("clicks")
        assert clicks[["request_id", "item_id", "position"]].values.tolist() == \
            [[click["request_id"], click["item_id"], 1]]
    params = deep_merge(tiny_lineage, {"workdir": str(tmp_path), "ab": {"event_log": "events.sqlite"}})
    table, _ = online_ab(params)
    assert table[["variant", "requests", "clicked"]].values.tolist() == [["default", 1, 1]]
