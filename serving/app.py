"""The search service: `pailitao serve` / `make serve` (127.0.0.1:8000 unless told otherwise).

    POST /search       multipart: image (file) and/or text; optional k, query_id, user_id / session_id
                       (or X-User-Id / X-Session-Id headers: the A/B unit)
    POST /click        JSON {request_id, item_id}: a click on a shown result (event log)
    GET  /items/{id}   an item's metadata and image ids
    GET  /images/{id}  a thumbnail (JPEG) of an image id, or of an item id's first image; cached
    GET  /healthz      200 when every variant serves an index, else 503
    GET  /metrics      Prometheus text: latency histograms per stage, request counts by status
    GET  /             the search page (serving/static)

Every search runs on a bounded thread pool (serving.concurrency) with a bounded queue
(serving.queue): when both are full the request is answered 503 at once, and one that waits or
runs past serving.timeout_s gets 503 too, so the server never hangs. A background thread polls each
variant's index directory and swaps a newly published version in (Searcher.refresh), off the
request path; searches in flight finish on the version they started with.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pailitao.config import Paths
from retrieval.pipeline import (RERANK_PARTS, NotReady, QueryError, Searcher, TooLarge, UnknownItem, build_searcher,
                                load_embedder, resolve_model, variant_dirs)
from serving.ab import EventLog, UnknownImpression, Variant, assign, variants_from_params

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
FORM_SLACK = 256 * 1024   # multipart overhead + text fields on top of the image limit
STAGES = ("decode", "embed", "ann", "rerank", "total")


class Overloaded(RuntimeError):
    """No capacity (reason "overloaded") or the request ran out of time ("timeout")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Gate:
    """At most `concurrency` searches run (the pool's threads) and at most `queue` more wait."""

    def __init__(self, concurrency: int, queue: int, timeout: float):
        self.pool = ThreadPoolExecutor(max(1, int(concurrency)), thread_name_prefix="search")
        self.limit = max(1, int(concurrency)) + max(0, int(queue))
        self.timeout = float(timeout)
        self.admitted = 0
        self._lock = threading.Lock()

    def _release(self, _fut) -> None:
        with self._lock:
            self.admitted -= 1

    async def run(self, fn, *args):
        with self._lock:
            if self.admitted >= self.limit:
                raise Overloaded("overloaded")
            self.admitted += 1
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(self._release)  # a timed-out search keeps its slot until it really ends
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
        except asyncio.TimeoutError:
            fut.cancel()  # still queued: never runs
            raise Overloaded("timeout") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Metrics:
    """Per-app Prometheus registry (several apps in one process, e.g. tests, never collide)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pailitao_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("pailitao_request_seconds", "HTTP request latency (incl. queueing)",
                                         ["endpoint"], registry=r,
                                         buckets=(.005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5, 10))
        self.stage_seconds = Histogram("pailitao_search_stage_seconds", "search latency per pipeline stage",
                                       ["variant", "stage"], registry=r,
                                       buckets=(.0005, .001, .0025, .005, .01, .02, .03, .05, .075, .1, .25, .5, 1))
        self.rejected = Counter("pailitao_rejected_total", "searches refused with 503", ["reason"], registry=r)
        self.in_flight = Gauge("pailitao_searches_admitted", "searches running or queued", registry=r)
        self.reloads = Counter("pailitao_index_reloads_total", "index versions swapped in", ["variant"], registry=r)
        self.index_items = Gauge("pailitao_index_vectors", "vectors in the served index", ["variant"], registry=r)


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status, headers=headers)


def build_searchers(params: dict, variants: list[Variant] | None = None) -> dict[str, Searcher]:
    """One Searcher per variant, each with its own index directory; variants serving the same
    checkpoint share one loaded embedder."""
    variants = variants or variants_from_params(params)
    embedders, out = {}, {}
    for v in variants:
        info = resolve_model(params, v.model)
        if info.fingerprint not in embedders:
            embedders[info.fingerprint] = load_embedder(info)
        emb_dir, index_dir = variant_dirs(params, v.model, None if v.name == "default" else v.name)
        out[v.name] = build_searcher(params, v.model, emb_dir, index_dir, embedder=embedders[info.fingerprint],
                                     info=info)
    return out


def _thumbnail(path: str, size: int) -> bytes:
    im = Image.open(path).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


async def _read_form(request: Request, limit: int):
    """The multipart form, refusing bodies over `limit` bytes before or while reading them."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is {length} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body exceeds {limit} bytes")
    request._body = bytes(body)  # starlette's form() reads the body through this cache
    try:
        return await request.form(max_files=2, max_fields=16, max_part_size=FORM_SLACK)
    except Exception as e:  # noqa: BLE001 - malformed multipart
        raise QueryError(f"malformed form data: {getattr(e, 'detail', e)}") from None


def create_app(params: dict, searchers: dict[str, Searcher] | None = None,
               event_log: EventLog | None = None, start_reloader: bool = True) -> FastAPI:
    """The app over `searchers` (default: built from params, one per A/B variant). event_log:
    default from params ab.event_log (below the workdir)."""
    s = params["serving"]
    if s.get("torch_threads"):
        # concurrency searches x these threads should about fill the cores; faiss's OpenMP pool
        # would otherwise add its own threads per search on top of torch's
        import faiss
        import torch
        torch.set_num_threads(int(s["torch_threads"]))
        faiss.omp_set_num_threads(int(s["torch_threads"]))
    variants = variants_from_params(params)
    searchers = searchers if searchers is not None else build_searchers(params, variants)
    missing = {v.name for v in variants} - set(searchers)
    if missing:
        raise ValueError(f"no searcher for variants {sorted(missing)}")
    if event_log is None and params["ab"].get("event_log"):
        event_log = EventLog(Paths.from_params(params).workdir / params["ab"]["event_log"])
    salt, top_k, max_k = str(params["ab"]["salt"]), int(s["top_k"]), int(s["max_k"])
    body_limit = max(x.limits.max_bytes for x in searchers.values()) + FORM_SLACK
    gate = Gate(s["concurrency"], s["queue"], s["timeout_s"])
    metrics = Metrics()
    metrics.in_flight.set_function(lambda: gate.admitted)
    thumbnail = functools.lru_cache(maxsize=int(s["thumbnail_cache"]))(_thumbnail)
    stop = threading.Event()

    def refresh_all() -> None:
        for name, searcher in searchers.items():
            if searcher.refresh():
                metrics.reloads.labels(name).inc()
            if searcher.ready:
                metrics.index_items.labels(name).set(searcher.snapshot().loaded.index.ntotal)

    def poll() -> None:
        while not stop.wait(float(s["reload_seconds"])):
            try:
                refresh_all()
            except Exception:  # noqa: BLE001 - a bad version must not kill the poller
                log.exception("index refresh failed")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        refresh_all()
        thread = threading.Thread(target=poll, name="index-reloader", daemon=True) if start_reloader else None
        if thread:
            thread.start()
        yield
        stop.set()
        if thread:
            thread.join(timeout=5)
        gate.close()

    app = FastAPI(title="Pailitao-VL search", lifespan=lifespan)
    app.state.searchers, app.state.gate, app.state.metrics, app.state.event_log = searchers, gate, metrics, event_log
    app.state.refresh_all = refresh_all

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(QueryError)
    async def query_error(request: Request, e: QueryError):
        return _error(e.status, e.code, str(e))

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, e: NotReady):
        return _error(503, "not_ready", str(e), {"Retry-After": "5"})

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        metrics.rejected.labels(e.reason).inc()
        msg = "too many searches at once" if e.reason == "overloaded" else \
            f"the search did not finish within {gate.timeout:g} s"
        return _error(503, e.reason, msg, {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "http_error", str(e.detail))

    def any_searcher() -> Searcher:
        ready = [x for x in searchers.values() if x.ready]
        if not ready:
            raise NotReady("no index loaded yet")
        return ready[0]

    def run_search(searcher: Searcher, variant: str, image, text, k, request_id, query_id, unit):
        res = searcher.search(image, text, k, request_id)
        out = {**res.to_dict(), "variant": variant, "query_id": query_id}
        for stage in STAGES + tuple(f"rerank_{p}" for p in RERANK_PARTS):
            if stage in res.latency_ms:   # the reranker's parts only where one ran
                metrics.stage_seconds.labels(variant, stage).observe(res.latency_ms[stage] / 1e3)
        if event_log is not None:
            try:
                event_log.impression(request_id=request_id, query_id=query_id, unit_id=unit, variant=variant,
                                     model=res.model, index_version=res.index_version, results=out["results"],
                                     latency_ms=res.latency_ms)
            except Exception:  # noqa: BLE001 - a shopper gets results even when logging fails
                log.exception("impression %s not logged", request_id)
        return out

    @app.post("/search")
    async def search(request: Request):
        request_id = uuid.uuid4().hex
        form = await _read_form(request, body_limit)
        upload = form.get("image") or None   # an empty file input arrives as "" (no filename)
        if upload is not None and not isinstance(upload, UploadFile):
            raise QueryError("the image field must be a file upload")
        image = await upload.read() if upload is not None else None
        text = form.get("text")
        text = text if isinstance(text, str) else None
        try:
            k = int(form.get("k") or top_k)
        except ValueError:
            raise QueryError(f"k must be an integer, got {form.get('k')!r}") from None
        if not 1 <= k <= max_k:
            raise QueryError(f"k must be in 1..{max_k}, got {k}")
        unit = (request.headers.get("x-user-id") or request.headers.get("x-session-id")
                or form.get("user_id") or form.get("session_id") or request_id)
        query_id = str(form.get("query_id") or request_id)
        variant = assign(str(unit), salt, variants)
        out = await gate.run(run_search, searchers[variant.name], variant.name, image, text, k,
                             request_id, query_id, str(unit))
        return JSONResponse(out, headers={"X-Request-Id": request_id})

    @app.post("/click")
    async def click(request: Request):
        try:
            body = await request.json()
            request_id, item_id = str(body["request_id"]), str(body["item_id"])
        except Exception:  # noqa: BLE001
            raise QueryError('send JSON {"request_id": ..., "item_id": ...}') from None
        if event_log is None:
            return _error(404, "unknown_impression", "the event log is off (ab.event_log)")
        try:
            return await asyncio.to_thread(event_log.click, request_id, item_id)
        except UnknownImpression as e:
            return _error(404, "unknown_impression", str(e))

    @app.get("/items/{item_id:path}")
    def item(item_id: str):
        return any_searcher().item(item_id)

    @app.get("/images/{image_id:path}")
    def image(image_id: str, size: int | None = None):
        size = min(int(size or s["thumbnail_size"]), 1024)
        path = any_searcher().image_path(image_id)
        if path is None or not path.is_file():
            raise UnknownItem(f"no image for {image_id!r}")
        etag = hashlib.sha1(f"{path}:{size}".encode()).hexdigest()[:16]
        return Response(thumbnail(str(path), size), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400", "ETag": f'"{etag}"'})

    @app.get("/healthz")
    def healthz():
        status = {name: x.status() for name, x in searchers.items()}
        ok = all(v["ready"] for v in status.values())
        body = {"status": "ok" if ok else "not_ready", "variants": status, "ab": len(variants) > 1,
                "admitted": gate.admitted, "event_log": str(event_log.path) if event_log else None}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(params: dict, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    app = create_app(params)
    host, port = host or params["serving"]["host"], int(port or params["serving"]["port"])
    log.info("search page: http://%s:%d/", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
