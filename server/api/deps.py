"""FastAPI dependencies as ``Annotated`` aliases: the request's database session, the HSM and
the settings, and the client's address. The principals (who is calling) come from
:mod:`server.api.pipeline`.

All of them are ``async`` and do no I/O, so FastAPI solves them on the event loop without a
thread-pool hand-off: the session connects on its first statement, which runs in the
endpoint's thread, where the pipeline also ends its transaction.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from server.api.requestid import request_id
from server.config import Settings
from server.errors import HsmError
from server.hsm import Hsm
from server.services import audit, dpop


async def get_db(request: Request) -> Session:
    """The request's session (its unit of work; see :mod:`server.api.pipeline`)."""
    session: Session = request.app.state.sessions()
    return session


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


async def get_origin(request: Request) -> audit.Origin:
    """This node's name and the request's id, for the audit records of key uses."""
    settings: Settings = request.app.state.settings
    return audit.Origin(settings.node_name, request_id(request))


SessionDep = Annotated[Session, Depends(get_db)]
HsmDep = Annotated[Hsm, Depends(get_hsm)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
OriginDep = Annotated[audit.Origin, Depends(get_origin)]


def proof_key(session: Session, request: Request, *, required: bool) -> str | None:
    """The thumbprint of the device key whose DPoP proof (RFC 9449) comes with a login or a
    refresh, checked and recorded in ``session``; None when there is none and none is
    ``required``.

    :raises InvalidDpopProof: a bad proof, or none where one is required.
    """
    proofs = request.headers.getlist("dpop")
    if not proofs and not required:
        return None
    return dpop.check_proof(
        session, proofs, method=request.method, url=str(request.url), jkt=None
    )


def client_address(request: Request) -> str:
    """The client's address for the budgets per client (login, /tsa): the TCP peer.
    ``server run`` trusts no ``X-Forwarded-For`` (uvicorn ``proxy_headers=False``), so a client
    cannot choose it; behind a load balancer it is the balancer's unless that keeps the
    client's (PROXY protocol)."""
    return request.client.host if request.client is not None else "unknown"
