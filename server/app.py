"""The FastAPI application factory.

``create_app(settings)`` builds the app; the HSM session is opened in the lifespan (so each
uvicorn worker process opens its own after the fork) unless the caller passes one, and lives on
``app.state.hsm``; a node whose token lacks the deployment's CA key refuses to start. The
session factory lives on ``app.state`` too; its sessions carry the server's HSM keys
(:func:`server.db.server_keys`). Every route goes through the one request pipeline of
:mod:`server.api.pipeline`; every response carries the request's ``X-Request-Id``; every request
is counted and timed by :class:`server.api.metrics.Metrics` (``GET /metrics``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from server import ca
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimit
from server.api.metrics import Metrics
from server.api.requestid import RequestId
from server.api.routes import admin, audit, auth, csc, health, metrics, piv, pki
from server.config import Settings
from server.db import bind_keys, make_engine, session_factory
from server.hsm import Hsm, softhsm
from server.hsm.pkcs11 import quiet_search_finalizers
from server.hsm.secrets import ServerKeys
from server.services import checkpoints, enrollment
from server.services.hashing import token_digest

DATA_DIR_ENV = "CARDBRIDGE_DATA"
"""Names the data directory when ``create_app`` is called without settings (uvicorn factory)."""


def open_hsm(settings: Settings) -> Hsm:
    """Open the node's HSM token and check that it holds the deployment's CA key.

    :raises Conflict: the token lacks the CA key (another token, another deployment's
        directory): the node must not start.
    """
    if settings.softhsm_conf is not None:
        softhsm.use_conf(settings.softhsm_conf)
    quiet_search_finalizers()
    hsm = Hsm.open(settings.hsm_module, settings.token_label, settings.hsm_pin())
    try:
        ca.require_ca_key(hsm, *enrollment.load_ca(settings))
    except BaseException:
        hsm.close()
        raise
    return hsm


def create_app(
    settings: Settings | None = None,
    *,
    hsm: Hsm | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> FastAPI:
    """Build the server's ASGI app.

    :param settings: the data directory's settings; ``None`` loads them from ``$CARDBRIDGE_DATA``
        (what ``uvicorn --factory server.app:create_app`` does in each worker).
    :param hsm: an open HSM session to use (tests); the app then never closes it.
    :param sessions: a session factory to use (tests) instead of an engine over
        ``settings.db_url`` that the app creates and disposes of.
    """
    if settings is None:
        settings = Settings.load(os.environ[DATA_DIR_ENV])
    resolved = settings
    owned = None
    if sessions is None:
        owned = make_engine(settings.db_url)
        sessions = session_factory(owned)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        to_thread.current_default_thread_limiter().total_tokens = resolved.threads
        opened: Hsm | None = None
        if getattr(app.state, "hsm", None) is None:
            opened = open_hsm(resolved)
            app.state.hsm = opened
        try:
            bind_keys(app.state.sessions, ServerKeys.load(app.state.hsm))
            async with checkpoints.exporting(app.state.sessions, resolved):
                yield
        finally:
            if opened is not None:
                app.state.hsm = None
                opened.close()
            if owned is not None:
                owned.dispose()

    app = FastAPI(
        title="cardbridge signing server",
        version="1",
        summary="PIV keys in an HSM: CSC signing API, PIV operations, administration, audit.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.hsm = hsm
    app.state.sessions = sessions
    app.state.metrics_token = _metrics_token(settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestId)
    app.add_middleware(Metrics)  # outermost: it counts what the others answer too
    for module in (piv, csc, auth, health, pki, admin, audit, metrics):  # the busiest first
        for router in module.routers:
            app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _metrics_token(settings: Settings) -> str | None:
    """SHA-256 (hex) of this node's metrics token, or None when its data directory has none (a
    directory of an earlier release: only the admin token reads ``/metrics`` until ``server
    init`` or ``server join`` runs on it again)."""
    try:
        token = settings.metrics_token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token_digest(token) if token else None


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its 422 answers: validation errors are 400 here."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema or {}
