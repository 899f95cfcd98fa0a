"""The FastAPI application factory.

``create_app(settings)`` builds the app; the HSM session is opened in the lifespan (so each
uvicorn worker process opens its own after the fork) unless the caller passes one, and lives on
``app.state.hsm``. The session factory lives on ``app.state`` too; its sessions carry the server's
HSM keys (:func:`server.db.server_keys`). Every route goes through the one request pipeline of
:mod:`server.api.pipeline`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from server.api.errors import install_error_handlers
from server.api.limits import BodyLimit
from server.api.routes import admin, audit, auth, csc, health, piv
from server.config import Settings
from server.db import bind_keys, make_engine, session_factory
from server.hsm import Hsm
from server.hsm.secrets import ServerKeys
from server.services import checkpoints

DATA_DIR_ENV = "CARDBRIDGE_DATA"
"""Names the data directory when ``create_app`` is called without settings (uvicorn factory)."""


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
        opened: Hsm | None = None
        if getattr(app.state, "hsm", None) is None:
            if resolved.softhsm_conf is not None:
                os.environ["SOFTHSM2_CONF"] = str(resolved.softhsm_conf)
            opened = Hsm.open(resolved.hsm_module, resolved.token_label, resolved.hsm_pin())
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
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    for module in (csc, health, auth, piv, admin, audit):
        for router in module.routers:
            app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


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
