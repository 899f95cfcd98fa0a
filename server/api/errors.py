"""The one place where errors become HTTP responses ``{"error", "error_description"}``.

Domain errors (``server.errors.ServerError``) carry their own stable code and status; request
validation failures are ``400 invalid_request`` (CSC v2 §10); unknown routes and methods keep
their HTTP status; anything unexpected is logged and answered ``500 server_error`` without
details.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import PinIncorrect, ServerError
from server.schemas import ErrorResponse
from server.services.dpop import ALGORITHMS

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    401: "invalid_token",
    403: "access_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A router's OpenAPI ``responses``: ``statuses`` answered with the error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


def error_response(
    status: int, code: str, description: str, *, retries: int | None = None
) -> JSONResponse:
    """Build the error body; 401 responses also name the schemes (RFC 6750 §3, RFC 9449 §7.1)."""
    headers = (
        {"WWW-Authenticate": f'DPoP algs="{" ".join(ALGORITHMS)}", Bearer'}
        if status == 401
        else None
    )
    body: dict[str, Any] = {"error": code, "error_description": description}
    if retries is not None:
        body["retries"] = retries
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handler table on ``app``."""

    @app.exception_handler(ServerError)
    def server_error(_: Request, exc: ServerError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.description)
        retries = exc.retries if isinstance(exc, PinIncorrect) else None
        return error_response(exc.status, exc.code, exc.description, retries=retries)

    @app.exception_handler(RequestValidationError)
    def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        # The message never echoes the input: it may be a PIN or a password.
        description = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return error_response(400, "invalid_request", description)

    @app.exception_handler(StarletteHTTPException)
    def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return error_response(500, "server_error", "internal error")
