"""The one request pipeline: authenticate → authorize → validate → act (DESIGN.md, "How code is
laid out").

Every router is an :class:`APIRouter` of this module, so every route is a :class:`PipelineRoute`:

1. **Authenticate and authorize**, before the body is read: the route's access level comes from
   the principal dependency it declares (:data:`UserDep`, :data:`PivUserDep`, :data:`AdminDep`;
   the same declaration puts the security scheme into the OpenAPI document). The token (and,
   for a device-bound session, its DPoP proof, RFC 9449) is checked in the thread pool; a
   missing, unknown or replayed credential is a 401 and a wrong kind of principal a 403,
   whatever the body holds.
2. **Validate**: FastAPI parses the body and solves the dependencies (all of them ``async``
   and I/O-free: the session dependency connects lazily).
3. **Act**: the endpoint runs in the thread pool (nothing that blocks runs on the event loop),
   and its unit of work ends there, once: committed when the endpoint returns, rolled back when
   it raises, except for errors that record an attempt (``ServerError.commit``: a wrong PIN, a
   wrong one-time password, a refused key use), whose counters and audit records are committed
   before the error is answered.

An answer that used the HSM carries ``Server-Timing: app;dur=…, hsm;dur=…`` (milliseconds, W3C
Server Timing): the relay's benchmark splits a signature's time with it. Decryption conceals it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterator
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter as _FastApiRouter
from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from server.db import unit_of_work
from server.errors import Forbidden, Unauthorized
from server.hsm import HSM_CLOCK, HsmClock
from server.services import dpop, tokens
from server.services.tokens import Principal

_bearer = HTTPBearer(
    auto_error=False,
    description="An access token (``Authorization: Bearer``), a device-bound one "
    "(``Authorization: DPoP`` with a ``DPoP`` proof, RFC 9449), or the admin token",
)


class Access(Enum):
    """Who a route serves."""

    USER = "a user's access token"
    PIV = "a user's device-bound session opened with password and one-time password"
    ADMIN = "the admin token"


async def _user(request: Request, _: Annotated[Any, Depends(_bearer)]) -> Principal:
    principal: Principal = request.state.principal
    return principal


async def _piv_user(request: Request, _: Annotated[Any, Depends(_bearer)]) -> Principal:
    principal: Principal = request.state.principal
    return principal


async def _admin(request: Request, _: Annotated[Any, Depends(_bearer)]) -> Principal:
    principal: Principal = request.state.principal
    return principal


UserDep = Annotated[Principal, Depends(_user)]
"""The caller, a user (any of their sessions)."""
PivUserDep = Annotated[Principal, Depends(_piv_user)]
"""The caller, a user whose session is bound to an enrolled device and was opened with the
second factor: what every PIV operation needs."""
AdminDep = Annotated[Principal, Depends(_admin)]
"""The caller, the administrator."""

_ACCESS: dict[Callable[..., Any], Access] = {
    _user: Access.USER,
    _piv_user: Access.PIV,
    _admin: Access.ADMIN,
}


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _dependants(sub)


def access_of(dependant: Dependant) -> Access | None:
    """The access level a route declares through its principal dependency, or None (public).

    :raises TypeError: a route that declares two different levels.
    """
    found = {_ACCESS[d.call] for d in _dependants(dependant) if d.call in _ACCESS}
    if len(found) > 1:
        raise TypeError(f"{dependant.call}: one principal dependency per route, not {found}")
    return found.pop() if found else None


def _credentials(request: Request) -> tuple[str, str]:
    """The scheme and token of the ``Authorization`` header (RFC 6750 §2.1, RFC 9449 §7.1)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme not in ("bearer", "dpop") or not token:
        raise Unauthorized("a Bearer or DPoP access token is required")
    return scheme, token


def authenticate(request: Request, access: Access) -> Principal:
    """Step 1 of the pipeline, in a worker thread: who is calling, and may they call this?

    :raises Unauthorized: no token, an unknown, expired or revoked one, a device-bound token
        without a valid, fresh, unused DPoP proof of its key (or sent as Bearer).
    :raises Forbidden: a principal of the wrong kind for ``access``.
    """
    scheme, token = _credentials(request)
    with unit_of_work(request.app.state.sessions()) as session:
        principal = tokens.authenticate(session, token)
        if principal.jkt is not None or scheme == "dpop":
            if scheme != "dpop" or principal.jkt is None:
                raise Unauthorized("a device-bound token is sent with its DPoP proof")
            dpop.check_proof(
                session,
                request.headers.getlist("dpop"),
                method=request.method,
                url=str(request.url),
                jkt=principal.jkt,
                access_token=token,
            )
    _authorize(principal, access)
    return principal


def _authorize(principal: Principal, access: Access) -> None:
    if access is Access.ADMIN:
        if principal.kind != "admin":
            raise Forbidden("this operation needs the admin token")
        return
    if principal.kind == "admin":
        raise Forbidden("this operation needs a user's access token")
    if access is Access.PIV and not (principal.second_factor and principal.jkt is not None):
        raise Forbidden(
            "PIV operations need a session of an enrolled device, opened with password and "
            "one-time password"
        )


def in_unit_of_work(
    endpoint: Callable[..., Any], *, status_code: int, exclude_none: bool
) -> Callable[..., Any]:
    """Wrap a sync endpoint so that the request's session ends its transaction once
    (:func:`server.db.unit_of_work`), in the endpoint's thread, and the model it returns is
    encoded there too (FastAPI would go back to the thread pool to validate it again)."""
    if getattr(endpoint, "__unit_of_work__", False) or asyncio.iscoroutinefunction(endpoint):
        return endpoint

    @functools.wraps(endpoint)
    def act(*args: Any, **kwargs: Any) -> Any:
        session = next((v for v in kwargs.values() if isinstance(v, Session)), None)
        if session is None:
            result = endpoint(*args, **kwargs)
        else:
            with unit_of_work(session):
                result = endpoint(*args, **kwargs)
        if isinstance(result, BaseModel):
            return Response(
                result.model_dump_json(exclude_none=exclude_none),
                status_code=status_code,
                media_type="application/json",
            )
        return result

    act.__unit_of_work__ = True  # type: ignore[attr-defined]
    return act


class PipelineRoute(APIRoute):
    """A FastAPI route whose requests go through the pipeline above."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        act = in_unit_of_work(
            endpoint,
            status_code=kwargs.get("status_code") or 200,
            exclude_none=bool(kwargs.get("response_model_exclude_none")),
        )
        super().__init__(path, act, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        validate_and_act = super().get_route_handler()
        access = access_of(self.dependant)
        if access is None:
            return validate_and_act

        async def handler(request: Request) -> Response:
            started = time.perf_counter()
            clock = HsmClock()
            HSM_CLOCK.set(clock)
            request.state.principal = await run_in_threadpool(authenticate, request, access)
            response = await validate_and_act(request)
            if clock.seconds and clock.shown:
                app_ms = (time.perf_counter() - started) * 1000
                response.headers["Server-Timing"] = (
                    f"app;dur={app_ms:.3f}, hsm;dur={clock.seconds * 1000:.3f}"
                )
            return response

        return handler


class APIRouter(_FastApiRouter):
    """FastAPI's router with :class:`PipelineRoute` as its route class (the only one used)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(route_class=PipelineRoute, **kwargs)
