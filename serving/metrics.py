"""The service's Prometheus metrics (what GET /metrics exposes), one `Metrics` holder per app.

Its own module because two parts of the service fill it: the Guard middleware (serving/guard.py:
requests, latency, errors and client hang-ups per route) and the app (serving/app.py: per-stage
search latency, refusals, admitted searches, index reloads and size). Each app gets its own
registry, so several apps in one process (tests, benchmarks) never collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.errors = Counter("pailitao_errors_total", "4xx/5xx answers by route template, status and error code",
                              ["endpoint", "status", "code"], registry=r)
        self.disconnects = Counter("pailitao_client_disconnects_total", "clients that hung up before the answer",
                                   ["endpoint"], registry=r)
