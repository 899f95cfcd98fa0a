"""The one request pipeline: authenticate → authorize → validate → act (DESIGN.md, "How code is
laid out").

Every router is an :class:`APIRouter` of this module, so every route is a :class:`PipelineRoute`.
A route's access level comes from the principal dependency it declares (:data:`UserDep`,
:data:`PivUserDep`, :data:`AdminDep`, :data:`MetricsDep`; the same declaration puts the
security scheme into the OpenAPI document), and every protected endpoint is a sync function: its
request is handed to the thread pool once (nothing that blocks runs on the event loop), and
there, in this order:

1. **Authenticate and authorize**: the token (and, for a device-bound session, its DPoP proof,
   RFC 9449) is checked and its proof recorded, in the request's unit of work (the proof's
   record committed at once; the metrics token without the database); a missing, unknown or
   replayed credential is a 401 and a wrong kind of principal a 403, whatever the body holds.
2. **Validate**: FastAPI read and parsed the body and solved the dependencies on the event loop
   (all of them ``async`` and I/O-free: the session dependency connects lazily) before the
   hand-off, so that one hand-off serves the whole request; nothing of them is used before
   step 1 passed. The endpoint of a request that fails validation never runs: the route's
   handler authenticates the request in the thread pool before its 400 is answered, so an
   unauthenticated caller gets 401 whatever it sent, and learns nothing of validation.
3. **Act**: the endpoint's unit of work ends once: committed when the endpoint returns, rolled
   back when it raises, except for errors that record an attempt (``ServerError.commit``: a
   wrong PIN, a wrong one-time password, a refused key use), whose counters and audit records
   are committed before the error is answered.

One hand-off instead of two (authenticate, then act) saves a thread wake-up and its share of
interpreter contention on every request: measured in-process under this machine's test load,
about 0.1 to 0.5 ms of CPU and 2 to 5 ms of latency per request.

An answer that used the HSM carries ``Server-Timing: app;dur=…, hsm;dur=…`` (milliseconds, W3C
Server Timing): the relay's benchmark splits a signature's time with it. Decryption conceals it.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from enum import Enum
from typing import Annotated, Any, Final, cast

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
from server.services.hashing import token_digest
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
    METRICS = "the node's metrics token or the admin token"


_PENDING: Any = object()
"""What a principal dependency gives while the request is not yet authenticated: the endpoint's
wrapper replaces it with the principal step 1 found (and refuses to run without one)."""


async def _user(_: Annotated[Any, Depends(_bearer)]) -> Principal:
    return cast(Principal, _PENDING)


async def _piv_user(_: Annotated[Any, Depends(_bearer)]) -> Principal:
    return cast(Principal, _PENDING)


async def _admin(_: Annotated[Any, Depends(_bearer)]) -> Principal:
    return cast(Principal, _PENDING)


async def _metrics_reader(_: Annotated[Any, Depends(_bearer)]) -> Principal:
    return cast(Principal, _PENDING)


UserDep = Annotated[Principal, Depends(_user)]
"""The caller, a user (any of their sessions)."""
PivUserDep = Annotated[Principal, Depends(_piv_user)]
"""The caller, a user whose session is bound to an enrolled device and was opened with the
second factor: what every PIV operation needs."""
AdminDep = Annotated[Principal, Depends(_admin)]
"""The caller, the administrator."""
MetricsDep = Annotated[Principal, Depends(_metrics_reader)]
"""The caller, a metrics scraper with this node's metrics token (checked without the database,
so that a scrape answers while the database is down), or the administrator."""

_ACCESS: dict[Callable[..., Any], Access] = {
    _user: Access.USER,
    _piv_user: Access.PIV,
    _admin: Access.ADMIN,
    _metrics_reader: Access.METRICS,
}
METRICS_READER: Final = Principal(
    kind="metrics", name="metrics", user_id=None, token_id=0, second_factor=False
)


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


def _principal_params(dependant: Dependant) -> tuple[str, ...]:
    """The endpoint's parameters that receive the principal.

    :raises TypeError: a principal that reaches the endpoint through another dependency (it
        would be solved before the request is authenticated).
    """
    direct = [d for d in dependant.dependencies if d.call in _ACCESS]
    nested = [d for sub in dependant.dependencies for d in _dependants(sub) if d.call in _ACCESS]
    if nested:
        raise TypeError(f"{dependant.call}: declare the principal as the endpoint's parameter")
    return tuple(str(d.name) for d in direct)


def _credentials(request: Request) -> tuple[str, str]:
    """The scheme and token of the ``Authorization`` header (RFC 6750 §2.1, RFC 9449 §7.1)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme not in ("bearer", "dpop") or not token:
        raise Unauthorized("a Bearer or DPoP access token is required")
    return scheme, token


def authenticate(request: Request, access: Access, session: Session | None = None) -> Principal:
    """Step 1 of the pipeline, in a worker thread: who is calling, and may they call this?

    It reads in ``session``, the request's own unit of work, when the endpoint has one (one
    transaction serves the whole request), or in a unit of work of its own. A DPoP proof's
    ``jti`` is committed as soon as it is recorded, so that a request is never replayed, even
    one whose endpoint rolls back.

    :raises Unauthorized: no token, an unknown, expired or revoked one, a device-bound token
        without a valid, fresh, unused DPoP proof of its key (or sent as Bearer).
    :raises Forbidden: a principal of the wrong kind for ``access``.
    """
    scheme, token = _credentials(request)
    if access is Access.METRICS and scheme == "bearer":
        expected: str | None = request.app.state.metrics_token
        if expected is not None and hmac.compare_digest(token_digest(token), expected):
            return METRICS_READER
    if session is None:
        with unit_of_work(request.app.state.sessions()) as own:
            return authenticate(request, access, own)
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
        session.commit()
    _authorize(principal, access)
    return principal


def _authorize(principal: Principal, access: Access) -> None:
    if access is Access.ADMIN or access is Access.METRICS:
        if principal.kind != "admin":
            raise Forbidden(f"this operation needs {access.value}")
        return
    if principal.kind == "admin":
        raise Forbidden("this operation needs a user's access token")
    if access is Access.PIV and not (principal.second_factor and principal.jkt is not None):
        raise Forbidden(
            "PIV operations need a session of an enrolled device, opened with password and "
            "one-time password"
        )


class _Steps:
    """What the endpoint's wrapper needs of its route, known once FastAPI analysed it."""

    access: Access | None = None
    principal_params: tuple[str, ...] = ()


def _act(
    endpoint: Callable[..., Any], steps: _Steps, *, status_code: int, exclude_none: bool
) -> Callable[..., Any]:
    """Wrap a sync endpoint so that, in its worker thread, the request is authenticated and
    authorized first (protected routes), then the endpoint runs in its session's unit of work
    (:func:`server.db.unit_of_work`), and the model it returns is encoded there too (FastAPI
    would go back to the thread pool to validate it again)."""

    def authenticated(session: Session | None, kwargs: dict[str, Any]) -> None:
        if steps.access is None:
            return
        request = _REQUEST.get()
        request.state.authenticating = True
        principal = authenticate(request, steps.access, session)
        for name in steps.principal_params:
            if kwargs[name] is not _PENDING:
                raise RuntimeError(f"{name} was not left for the pipeline to fill")
            kwargs[name] = principal

    @functools.wraps(endpoint)
    def act(*args: Any, **kwargs: Any) -> Any:
        session = next((v for v in kwargs.values() if isinstance(v, Session)), None)
        if session is None:
            authenticated(None, kwargs)
            result = endpoint(*args, **kwargs)
        else:
            with unit_of_work(session):
                authenticated(session, kwargs)
                result = endpoint(*args, **kwargs)
        if isinstance(result, BaseModel):
            return Response(
                result.model_dump_json(exclude_none=exclude_none),
                status_code=status_code,
                media_type="application/json",
            )
        return result

    act.__pipeline_endpoint__ = endpoint  # type: ignore[attr-defined]
    return act


_REQUEST: ContextVar[Request] = ContextVar("cardbridge_request")
"""The request a protected endpoint's wrapper authenticates (the thread pool copies the
context)."""


class PipelineRoute(APIRoute):
    """A FastAPI route whose requests go through the pipeline above.

    :raises TypeError: a protected endpoint that is ``async`` (its authentication needs the
        thread pool), or whose principal is not its own parameter.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        steps = _Steps()
        # A route copied into another router (include_router) wraps the original endpoint.
        endpoint = getattr(endpoint, "__pipeline_endpoint__", endpoint)
        if not asyncio.iscoroutinefunction(endpoint):
            endpoint = _act(
                endpoint,
                steps,
                status_code=kwargs.get("status_code") or 200,
                exclude_none=bool(kwargs.get("response_model_exclude_none")),
            )
        self._steps = steps
        super().__init__(path, endpoint, **kwargs)  # calls get_route_handler, which fills steps
        if steps.access is not None and asyncio.iscoroutinefunction(endpoint):
            raise TypeError(f"{path}: a protected endpoint is a sync function")

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        validate_and_act = super().get_route_handler()
        self._steps.access = access = access_of(self.dependant)
        self._steps.principal_params = _principal_params(self.dependant)
        if access is None:
            return validate_and_act

        async def handler(request: Request) -> Response:
            started = time.perf_counter()
            clock = HsmClock()
            HSM_CLOCK.set(clock)
            _REQUEST.set(request)
            try:
                response = await validate_and_act(request)
            except Exception:
                if not getattr(request.state, "authenticating", False):
                    # Refused before the hand-off (validation): who asks decides the answer.
                    await run_in_threadpool(authenticate, request, access)
                raise
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
