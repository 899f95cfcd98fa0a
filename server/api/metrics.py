# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of the server, kept in one place: the :class:`Metrics` middleware.

Every HTTP request passes it, so it counts requests by route template (never the raw path),
method and status, and times them per route. What only the services know comes as notes
(:mod:`server.observe`): the key operation a request asked for (signatures by endpoint, key
algorithm and outcome) and the PINs and PUKs it blocked. What only the error handlers know comes
through the request's state (:func:`note_failure`): the stable error code, and whether the HSM
or the database failed (the 503 paths).

``server run`` starts several worker processes. It gives them a private, empty directory in
``PROMETHEUS_MULTIPROC_DIR`` (:func:`server.serving.metrics_dir`) before any of them imports
prometheus-client, which then keeps each process's values in memory-mapped files there; a
scrape of ``/metrics`` (any worker) sums the files of all of them. Without that variable (one
process, tests) the values live in this process.

The cost on the signing path: a dictionary lookup and a few increments of memory-mapped floats
per request, a few µs of CPU (``scripts/bench-metrics`` measures it; the README has its figures).
"""

from __future__ import annotations

import os
import time
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.observe import OBSERVATION, Observation
from server.services.keyuse import SIGNING
from server.serving import MULTIPROC_ENV

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format that :func:`exposition` writes."""

REGISTRY: Final = CollectorRegistry()
"""This process's metrics (what a scrape shows when the server runs as one process)."""

REQUESTS: Final = Counter(
    "cardbridge_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ("endpoint", "method", "status"),
    registry=REGISTRY,
)
LATENCY: Final = Histogram(
    "cardbridge_http_request_duration_seconds",
    "Time from a request's arrival to its last response byte, by route template and method.",
    ("endpoint", "method"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SIGNATURES: Final = Counter(
    "cardbridge_signatures",
    "Signatures asked for (each digest of a signHash batch), by endpoint, key algorithm and "
    "outcome: ok, or the error code the request was answered with.",
    ("endpoint", "algorithm", "outcome"),
    registry=REGISTRY,
)
BACKEND_ERRORS: Final = Counter(
    "cardbridge_backend_errors",
    "Requests failed by the HSM or the database, by backend and error code "
    "(temporarily_unavailable: the 503 answers while it cannot be reached).",
    ("backend", "error"),
    registry=REGISTRY,
)
BLOCKS: Final = Counter(
    "cardbridge_pin_blocks",
    "Wrong PINs (secret=pin) or PUKs (secret=puk) that used the last try and blocked it.",
    ("secret",),
    registry=REGISTRY,
)

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR: Final = "error"
_BACKEND: Final = "backend"


def note_failure(conn: HTTPConnection, code: str, backend: str | None = None) -> None:
    """Record how the error handlers answered the request (its stable error code, and the
    backend that failed, if one did) for :class:`Metrics`."""
    state = conn.scope.setdefault("state", {})
    state[_ERROR] = code
    state[_BACKEND] = backend


class Metrics:
    """Count and time every HTTP request (a pure ASGI middleware: no task, no body copy)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        note = Observation()
        token = OBSERVATION.set(note)
        status = 500  # unless a response starts: an exception escaped to uvicorn

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            OBSERVATION.reset(token)
            self._record(scope, status, time.perf_counter() - started, note)

    def _record(self, scope: Scope, status: int, seconds: float, note: Observation) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "other"
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:
            children = (REQUESTS.labels(endpoint, method, str(status)),
                        LATENCY.labels(endpoint, method))  # fmt: skip
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        state = scope.get("state") or {}
        error = state.get(_ERROR)
        if note.operation in SIGNING:
            outcome = error or ("ok" if status < 400 else "server_error")
            SIGNATURES.labels(endpoint, note.algorithm, outcome).inc(note.count)
        backend = state.get(_BACKEND)
        if backend is not None:
            BACKEND_ERRORS.labels(backend, error).inc()
        for secret in note.blocked:
            BLOCKS.labels(secret).inc()


def exposition() -> bytes:
    """The text format of every metric: summed over all worker processes in multiprocess
    mode, else this process's."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
