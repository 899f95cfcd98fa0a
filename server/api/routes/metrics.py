"""``GET /metrics``: the server's Prometheus metrics (:mod:`server.api.metrics`), for this
node's metrics token or the admin token, never for anyone else."""

from __future__ import annotations

from fastapi import Response

from server.api import metrics
from server.api.errors import documented_errors
from server.api.pipeline import APIRouter, MetricsDep

router = APIRouter(tags=["Metrics"], responses=documented_errors(401, 403))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {metrics.CONTENT_TYPE: {}}}},
)
def read_metrics(_reader: MetricsDep) -> Response:
    """Requests by route, method and status; latency histograms per route; signatures by
    endpoint, key algorithm and outcome; HSM and database failures; PIN and PUK blocks. Summed
    over the node's worker processes. ``Authorization: Bearer`` with the node's metrics token
    (``DIR/metrics-token``) or the admin token."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


routers = [router]
