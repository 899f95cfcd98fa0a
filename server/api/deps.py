"""FastAPI dependencies as ``Annotated`` aliases: the database session, the HSM, the settings
and the authenticated principals (users and administrators).

FastAPI runs every plain ``def`` dependency in the thread pool, one hand-off per dependency;
on a 2-core signing server each hand-off costs more than a SQL statement. So the dependencies
that do no I/O are ``async def`` and run on the event loop, and only the ones that query the
database (the principal) go to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from server.config import Settings
from server.db import Direct
from server.errors import Forbidden, HsmError, Unauthorized
from server.hsm import Hsm
from server.services import tokens
from server.services.tokens import Principal

_bearer = HTTPBearer(auto_error=False, description="An access token or the admin token")
_basic = HTTPBasic(auto_error=False, description="The user's password (CSC auth/login)")


async def get_db(request: Request) -> AsyncIterator[Session]:
    """One session per request; services commit their own units of work.

    Opening a session does no I/O (it connects on its first statement). Closing one whose
    transaction the service ended (committed or rolled back) does none either; one left open
    (a read, or an error before the commit) is rolled back in the thread pool.
    """
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_hsm(request: Request) -> Hsm:
    """The process's HSM session, opened in the app's lifespan."""
    hsm: Hsm | None = request.app.state.hsm
    if hsm is None:
        raise HsmError("the HSM is not open")
    return hsm


async def get_settings(request: Request) -> Settings:
    """The data directory's settings (paths and security policy)."""
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_db)]
HsmDep = Annotated[Hsm, Depends(get_hsm)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
BasicDep = Annotated[HTTPBasicCredentials | None, Depends(_basic)]


async def bearer_token(credentials: BearerDep) -> str:
    """The Bearer token of the request; its absence is a 401."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("a Bearer token is required")
    return credentials.credentials


TokenDep = Annotated[str, Depends(bearer_token)]


async def request_bearer(request: Request) -> str:
    """:func:`bearer_token` outside the dependency system (``DirectRoute`` endpoints)."""
    return await bearer_token(await _bearer(request))


def get_direct(request: Request) -> Direct:
    """The process's :class:`~server.db.Direct` connection (the signing path's)."""
    direct: Direct = request.app.state.direct
    return direct


def get_principal(session: SessionDep, token: TokenDep) -> Principal:
    """Whoever the Bearer token names (an unknown or expired token is a 401)."""
    return tokens.authenticate(session, token)


def require_user(principal: Principal) -> Principal:
    """``principal`` if it is a user's access token; the admin token does not act as a user."""
    if principal.kind == "admin":
        raise Forbidden("this operation needs a user's access token")
    return principal


async def get_current_user(
    principal: Annotated[Principal, Depends(get_principal)],
) -> Principal:
    """A user's access token; the admin token does not act as a user."""
    return require_user(principal)


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """The admin token; a user's token is refused."""
    if principal.kind != "admin":
        raise Forbidden("this operation needs the admin token")
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]
AdminPrincipal = Annotated[Principal, Depends(get_admin)]
