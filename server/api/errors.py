"""The one place where errors become HTTP responses ``{"error", "error_description"}``.

Domain errors (``server.errors.ServerError``) carry their own stable code and status; request
validation failures are ``400 invalid_request`` (CSC v2 §10); unknown routes and methods keep
their HTTP status. A database or HSM that cannot be reached (PostgreSQL down or restarting, a
restarted network HSM) is ``503 temporarily_unavailable`` with ``Retry-After``, logged as one
line with the request's id; anything else unexpected is logged with its traceback and answered
``500 server_error`` without details.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import db
from server.api.metrics import note_failure
from server.api.requestid import HEADER, request_id
from server.errors import DatabaseUnavailable, PinIncorrect, ServerError, Unavailable
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

_CHALLENGE = f'DPoP algs="{" ".join(ALGORITHMS)}", Bearer'


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A router's OpenAPI ``responses``: ``statuses`` answered with the error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


def error_response(
    status: int,
    code: str,
    description: str,
    *,
    retries: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build the error body; 401 responses also name the schemes (RFC 6750 §3, RFC 9449 §7.1)."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": _CHALLENGE}
    body: dict[str, Any] = {"error": code, "error_description": description}
    if retries is not None:
        body["retries"] = retries
    return JSONResponse(body, status_code=status, headers=headers)


def _unavailable(request: Request, exc: Unavailable, cause: str) -> JSONResponse:
    """503 with ``Retry-After``, logged as one line (an outage is expected, not a bug)."""
    note_failure(request, exc.code, exc.backend)
    log.warning("%s [request %s]: %s", exc.code, request_id(request), cause)
    headers = {"Retry-After": str(exc.retry_after)}
    return error_response(exc.status, exc.code, exc.description, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handler table on ``app``."""

    @app.exception_handler(ServerError)
    def server_error(request: Request, exc: ServerError) -> JSONResponse:
        if isinstance(exc, Unavailable):
            return _unavailable(request, exc, exc.description)
        note_failure(request, exc.code, exc.backend)
        if exc.status >= 500:  # the request id, so the line matches what the client got
            log.error("%s [request %s]: %s", exc.code, request_id(request), exc.description)
        retries = exc.retries if isinstance(exc, PinIncorrect) else None
        return error_response(exc.status, exc.code, exc.description, retries=retries)

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        note_failure(request, "invalid_request")
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        # The message never echoes the input: it may be a PIN or a password.
        description = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return error_response(400, "invalid_request", description)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        note_failure(request, code)
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers with this from outside every middleware, Metrics included: what it
        # counts is the 500 itself. Note a failure only where a handler inside calls it.
        log.error("unexpected error [request %s]", request_id(request), exc_info=exc)
        # This answer bypasses the RequestId middleware (Starlette sends it from outside).
        headers = {HEADER: request_id(request)}
        return error_response(500, "server_error", "internal error", headers=headers)

    def database_error(request: Request, exc: Exception) -> JSONResponse:
        if not db.unavailable(exc):
            note_failure(request, "server_error", "database")
            return unexpected(request, exc)
        cause = str(getattr(exc, "orig", None) or exc).strip().partition("\n")[0]
        down = DatabaseUnavailable("The database is unavailable; retry later")
        return _unavailable(request, down, f"database: {cause}")

    # Registered by class, so that Starlette's ExceptionMiddleware answers them: what only the
    # catch-all above answers is re-raised to uvicorn, which logs its traceback once more.
    for db_error in _DB_ERRORS:
        app.add_exception_handler(db_error, database_error)


_DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeout, psycopg.Error)
