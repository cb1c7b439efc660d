"""The search service: `pailitao serve` / `make serve` (127.0.0.1:8000 unless told otherwise).

    POST /search       multipart: image (file) and/or text; optional k, query_id, user_id / session_id
                       (or X-User-Id / X-Session-Id headers: the A/B unit)
    POST /click        JSON {request_id, item_id}: a click on a shown result (event log); a repeat is
                       answered duplicate=true and not logged twice
    GET  /items/{id}   an item's metadata and image ids
    GET  /images/{id}  a thumbnail (JPEG) of an image id, or of an item id's first image; cached;
                       optional size in 1..serving.thumbnail_max_size
    GET  /healthz      200 when every variant serves an index, else 503
    GET  /metrics      Prometheus text: latency histograms per stage, request counts by status, errors by
                       route + status + code, client disconnects
    GET  /             the search page (serving/static)

Every search runs on a bounded thread pool (serving.concurrency) with a bounded queue
(serving.queue): when both are full the request is answered 503 at once, and one that waits or
runs past serving.timeout_s gets 503 too, so the server never hangs. A background thread polls each
variant's index directory and swaps a newly published version in (Searcher.refresh), off the
request path; searches in flight finish on the version they started with.

Every request passes the Guard middleware (serving/guard.py): a request id (X-Request-Id; /search's
request_id), one JSON error shape, a body read timeout and a cap on uploads read at once. The
Prometheus metrics are serving/metrics.py's. This module holds the app factory, its routes, the
search admission gate, building the variants' searchers, and `serve`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.config import Paths
from retrieval.query import NotReady, QueryError, TooLarge, UnknownItem
from retrieval.models import CHAMPION, build_reranker, load_embedder, pair_with_index, resolve_model, variant_dirs
from retrieval.pipeline import RERANK_PARTS, Searcher, build_searcher
from serving.ab import EventLog, UnknownImpression, Variant, assign, variants_from_params
from serving.guard import Guard, error_response
from serving.metrics import Metrics

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
FORM_SLACK = 256 * 1024   # multipart overhead + text fields on top of the image limit
STAGES = ("decode", "embed", "ann", "rerank", "total")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class BadParameter(QueryError):
    status, code = 422, "invalid_parameter"


class UnsupportedMedia(QueryError):
    status, code = 415, "unsupported_media_type"


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


def build_searchers(params: dict, variants: list[Variant] | None = None) -> dict[str, Searcher]:
    """One Searcher per variant over its own published index, with the model and dim that index was
    built with (pair_with_index: the registry's champion may be another run's model, at another
    dim). Variants serving the same checkpoint share one loaded embedder, and all share one
    reranker; the champion is resolved once. NothingToServe when a variant has no index or no
    checkpoint that built it."""
    variants = variants or variants_from_params(params)
    champion = resolve_model(params).name if params["serving"]["model"] == CHAMPION and len(variants) > 1 else None
    reranker = build_reranker(params)
    embedders, out = {}, {}
    for v in variants:
        emb_dir, index_dir = variant_dirs(params, v.model, None if v.name == "default" else v.name, champion)
        info, dim = pair_with_index(params, v.model, index_dir)
        if info.fingerprint not in embedders:
            embedders[info.fingerprint] = load_embedder(info)
        out[v.name] = build_searcher(params, v.model, emb_dir, index_dir, embedder=embedders[info.fingerprint],
                                     info=info, dim=dim, reranker=reranker)
    return out


def _thumbnail(path: str, size: int) -> bytes:
    im = Image.open(path).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _int_param(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise BadParameter(f"{name} must be an integer in {lo}..{hi}, got {raw!r}")
    return value


async def _read_form(request: Request, limit: int):
    """The multipart form, refusing bodies over `limit` bytes before or while reading them."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in FORM_TYPES:   # e.g. JSON would otherwise parse as an empty form (422)
        raise UnsupportedMedia(f"POST /search takes multipart/form-data (or application/x-www-form-urlencoded) "
                               f"with fields image (a file) and/or text; got {ctype}")
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
    max_thumb = int(s["thumbnail_max_size"])
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

    app.add_middleware(Guard, metrics=metrics, body_timeout=s["body_read_timeout_s"],
                       max_uploads=s["max_concurrent_uploads"])

    @app.exception_handler(QueryError)
    async def query_error(request: Request, e: QueryError):
        return error_response(request, e.status, e.code, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):   # FastAPI's own 422s, in our shape
        where = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return error_response(request, 422, "invalid_parameter", where)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, e: NotReady):
        return error_response(request, 503, "not_ready", str(e), {"Retry-After": "5"})

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        metrics.rejected.labels(e.reason).inc()
        msg = "too many searches at once" if e.reason == "overloaded" else \
            f"the search did not finish within {gate.timeout:g} s"
        return error_response(request, 503, e.reason, msg, {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):   # 404 no route, 405, ...
        return error_response(request, e.status_code, HTTPStatus(e.status_code).name.lower(), str(e.detail), e.headers)

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
        request_id = request.state.request_id   # the Guard's: errors and the impression log share it
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
        raw = await request.body()   # a hang-up or a body timeout propagates to the Guard
        try:
            body = json.loads(raw)
            request_id, item_id = str(body["request_id"]), str(body["item_id"])
        except (ValueError, KeyError, TypeError):
            raise QueryError('send JSON {"request_id": ..., "item_id": ...}') from None
        if event_log is None:
            return error_response(request, 404, "unknown_impression", "the event log is off (ab.event_log)")
        try:
            return {"duplicate": False, **await asyncio.to_thread(event_log.click, request_id, item_id)}
        except UnknownImpression as e:
            return error_response(request, 404, "unknown_impression", str(e))

    @app.get("/items/{item_id:path}")
    def item(item_id: str):
        return any_searcher().item(item_id)

    @app.get("/images/{image_id:path}")
    def image(image_id: str, size: str | None = None):
        size = _int_param("size", size, 1, max_thumb) if size is not None else int(s["thumbnail_size"])
        path = any_searcher().image_path(image_id)
        if path is None or not path.is_file():
            raise UnknownItem(f"no image for {image_id!r}")
        etag = hashlib.sha1(f"{path}:{size}".encode()).hexdigest()[:16]
        return Response(thumbnail(str(path), size), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400", "ETag": f'"{etag}"'})

    @app.get("/healthz")
    def healthz(request: Request):
        status = {name: x.status() for name, x in searchers.items()}
        ok = all(v["ready"] for v in status.values())
        body = {"status": "ok" if ok else "not_ready", "variants": status, "ab": len(variants) > 1,
                "admitted": gate.admitted, "event_log": str(event_log.path) if event_log else None}
        return JSONResponse(body) if ok else \
            error_response(request, 503, "not_ready", "not every variant serves an index (see variants)", extra=body)

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

    app = create_app(params)   # NothingToServe (exit code 2 in the CLI) when no index can be served
    for name, x in app.state.searchers.items():
        log.info("variant %s: %s at dim %d over %s", name, x.model.source, x.dim, x.index_dir)
    host, port = host or params["serving"]["host"], int(port or params["serving"]["port"])
    log.info("search page: http://%s:%d/", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
