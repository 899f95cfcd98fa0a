# SPDX-License-Identifier: Apache-2.0
"""``X-Request-Id``: every request gets an id that its response carries and that the audit
records of its key uses name, so an operator can match what a client received with the log.

A pure ASGI middleware (a header scan and a random id, a few µs: it runs on every signature).
An incoming ``X-Request-Id`` (a load balancer's or a client's) is kept when it is a sane token:
1-64 characters of ``A-Z a-z 0-9 . _ : -``; anything else is replaced, never echoed.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER: Final = "X-Request-Id"
_HEADER_KEY: Final = HEADER.lower().encode("latin-1")
_SANE: Final = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def request_id(conn: HTTPConnection) -> str:
    """The id :class:`RequestId` gave the request (``"-"`` outside the middleware)."""
    return str(conn.scope.get("state", {}).get("request_id", "-"))


class RequestId:
    """Give each HTTP request an id (``scope["state"]["request_id"]``) and return it in the
    ``X-Request-Id`` header of its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == _HEADER_KEY:
                rid = value if _SANE.fullmatch(value) else b""
                break
        if not rid:
            rid = secrets.token_hex(12).encode("ascii")
        scope.setdefault("state", {})["request_id"] = rid.decode("ascii")
        header = (_HEADER_KEY, rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
