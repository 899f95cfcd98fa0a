"""Liveness and readiness.

- ``GET /healthz``: the process serves requests; it touches neither the HSM nor the database.
- ``GET /readyz``: this node can serve key operations now: the database answers a query and
  the HSM token answers a lookup of the CA key, each within :data:`READY_TIMEOUT` seconds;
  otherwise ``503 temporarily_unavailable`` with ``Retry-After``. A load balancer takes a node
  out while it fails (``etc/haproxy/cardbridge.cfg``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import anyio
from fastapi import Request
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from server.api.errors import documented_errors
from server.api.pipeline import APIRouter
from server.config import Settings
from server.errors import DatabaseUnavailable, HsmUnavailable, Unavailable
from server.hsm import Hsm, KeyAlg, KeyRef
from server.schemas import HealthResponse

READY_TIMEOUT: Final = 2.0
"""Seconds each readiness check may take, waiting included."""
READY_THREADS: Final = 2
"""Threads that readiness checks may hold: a check that hangs (an unreachable network HSM or
database) keeps its thread, and later checks must not drain the server's thread pool."""

router = APIRouter(tags=["Health"])


@router.get("/healthz")
async def healthz() -> HealthResponse:
    """The process is up and serving requests (on the event loop: no thread-pool hand-off)."""
    return HealthResponse(status="ok")


@router.get("/readyz", responses=documented_errors(503))
async def readyz(request: Request) -> HealthResponse:
    """The node can serve key operations: the database and the HSM answer in time."""
    state = request.app.state
    if getattr(state, "ready_limiter", None) is None:
        state.ready_limiter = anyio.CapacityLimiter(READY_THREADS)
    sessions: sessionmaker[Session] = state.sessions
    hsm: Hsm | None = state.hsm
    settings: Settings = state.settings
    await asyncio.gather(
        _within(DatabaseUnavailable, "the database", lambda: _query(sessions), state.ready_limiter),
        _within(HsmUnavailable, "the HSM", lambda: _lookup_ca_key(hsm, settings),
                state.ready_limiter),  # fmt: skip
    )
    return HealthResponse(status="ok")


def _query(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.execute(text("SELECT 1"))


def _lookup_ca_key(hsm: Hsm | None, settings: Settings) -> None:
    if hsm is None:
        raise HsmUnavailable("The HSM is not open")
    if settings.ca_key_id is None or settings.ca_key_alg is None:
        raise HsmUnavailable("The data directory names no CA key")
    hsm.check(KeyRef(settings.ca_key_id, KeyAlg(settings.ca_key_alg)), READY_TIMEOUT)


async def _within(
    down: type[Unavailable], what: str, check: Callable[[], None], limiter: anyio.CapacityLimiter
) -> None:
    """Run ``check`` in a readiness thread; a check still running after the timeout is left
    behind in its thread and answered as ``down`` (the backend's unavailability)."""
    try:
        with anyio.fail_after(READY_TIMEOUT):
            await anyio.to_thread.run_sync(check, limiter=limiter, abandon_on_cancel=True)
    except TimeoutError:
        raise down(f"{what} did not answer within {READY_TIMEOUT:g} s") from None


routers = [router]
