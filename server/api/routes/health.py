"""Liveness: ``GET /healthz`` answers without touching the HSM or the database."""

from __future__ import annotations

from server.api.pipeline import APIRouter
from server.schemas import HealthResponse

router = APIRouter(tags=["Health"])


@router.get("/healthz")
async def healthz() -> HealthResponse:
    """The process is up and serving requests (on the event loop: no thread-pool hand-off)."""
    return HealthResponse(status="ok")


routers = [router]
