"""A request body size limit (rule 8: an oversized body is a clear 413, not memory pressure).

A pure ASGI middleware, so requests within the limit pay one header lookup and a byte count.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

MAX_BODY = 1 << 20
"""Largest request body accepted: far above any legitimate request (a 64-digest batch, a
certificate chain), far below what would hurt a worker."""


class BodyLimit:
    """Refuse request bodies over ``max_bytes``: by ``Content-Length`` before the app runs, or
    while streaming a body sent without one."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = f"request bodies are limited to {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            too_large = declared.isdigit()
            response = error_response(
                413 if too_large else 400,
                "request_too_large" if too_large else "invalid_request",
                self.too_large if too_large else "invalid Content-Length",
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, counted, send)
