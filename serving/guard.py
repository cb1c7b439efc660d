"""The `Guard`: the ASGI middleware around the whole search service, and the one error shape.

Every request gets an id (X-Request-Id; /search's request_id) and every error status one JSON shape,
{"error": {"status", "code", "message", "request_id"}} (`error_response`, which the app's routes and
exception handlers answer with too). A request body must arrive within serving.body_read_timeout_s
(else 408, connection closed) and at most serving.max_concurrent_uploads bodies are read at once
(else 503 + Retry-After), so slow or stalled uploads cannot pin the server. Every answer is counted
per route template, status and error code (serving/metrics.py); an unhandled exception becomes one
logged traceback and a 500, a client that hangs up one warning line.

Apart from serving/app.py because none of this knows about searching: it is the transport-level
contract every route shares, and it must hold even for requests no route ever sees.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from serving.metrics import Metrics

log = logging.getLogger(__name__)


class BodyTimeout(Exception):
    """The request body did not arrive within serving.body_read_timeout_s."""


def error_response(request: Request | dict, status: int, code: str, message: str,
                   headers: dict | None = None, extra: dict | None = None) -> JSONResponse:
    """The one error body (next to any `extra` keys); `request` (or its ASGI scope) gives the
    request id the Guard assigned, and keeps the code for the error metric."""
    state = (request.scope if isinstance(request, Request) else request).setdefault("state", {})
    state["error_code"] = code
    rid = state.get("request_id", "")
    error = {"status": status, "code": code, "message": message, "request_id": rid}
    return JSONResponse({**(extra or {}), "error": error}, status, headers={**(headers or {}), "X-Request-Id": rid})


class Guard:
    """Pure ASGI middleware around the whole app (a BaseHTTPMiddleware would let unhandled
    exceptions and hang-ups escape uncounted): assigns the request id, counts every answer per
    route template, bounds how long and how many request bodies are read, turns an unhandled
    exception into one logged traceback + a 500 in the error shape, and a client that hangs up
    into one warning line."""

    def __init__(self, app, metrics: Metrics, body_timeout: float, max_uploads: int):
        self.app, self.metrics = app, metrics
        self.body_timeout, self.max_uploads = float(body_timeout), max(1, int(max_uploads))
        self.uploads = 0   # bodies being read now; one event loop, so no lock

    def endpoint(self, scope: dict, before: dict) -> str:
        """The route template (FastAPI sets scope["route"]); else match the scope as it arrived
        (mounts and requests refused before routing)."""
        route = scope.get("route") or next(
            (r for r in scope["app"].router.routes if r.matches(before)[0] == Match.FULL), None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        before, t0 = dict(scope), time.monotonic()
        rid = scope.setdefault("state", {})["request_id"] = uuid.uuid4().hex
        status = None
        headers = Headers(scope=scope)
        reading = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers

        async def send_(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).setdefault("x-request-id", rid)
            await send(message)

        async def receive_():
            nonlocal reading
            if not reading:   # body done (later receives only wait for a disconnect): no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), t0 + self.body_timeout - time.monotonic())
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            if not message.get("more_body"):
                reading = False
                self.uploads -= 1
            return message

        async def answer(*args, **kw):
            await error_response(scope, *args, **kw)(scope, receive, send_)

        if reading and self.uploads >= self.max_uploads:
            await answer(503, "too_many_uploads", f"{self.max_uploads} uploads are being read already; retry",
                         {"Retry-After": "1", "Connection": "close"})   # its body stays unread: close
        else:
            self.uploads += reading
            try:
                await self.app(scope, receive_, send_)
            except BodyTimeout:
                if status is None:
                    await answer(408, "body_timeout", f"the request body did not arrive within "
                                 f"{self.body_timeout:g} s", {"Connection": "close"})
            except ClientDisconnect:   # the client hung up: nothing to answer, nothing broken here
                log.warning("client %s hung up during %s %s after %.1f s (request %s)", (scope.get("client") or
                            ("?",))[0], scope["method"], scope["path"], time.monotonic() - t0, rid)
                self.metrics.disconnects.labels(self.endpoint(scope, before)).inc()
                return
            except Exception:
                if status is not None:   # too late for an error answer: uvicorn logs it and drops the connection
                    raise
                log.exception("request %s: %s %s failed", rid, scope["method"], scope["path"])
                await answer(500, "internal_error", f"internal error; quote request id {rid} when reporting it")
            finally:
                if reading:
                    self.uploads -= 1
        endpoint = self.endpoint(scope, before)
        if status is not None:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status), scope["state"].get("error_code", "unknown")).inc()
        self.metrics.request_seconds.labels(endpoint).observe(time.monotonic() - t0)
