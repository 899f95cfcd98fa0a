"""What long-term signatures need from the deployment, public (no principal): the RFC 3161
time-stamping authority (``POST /tsa``), the CA's CRL (``GET /crl``, RFC 5280 §5) and the CA
certificate (``GET /ca.crt``, DER, the caIssuers of issued certificates; RFC 5280 §4.2.2.1).
"""

from __future__ import annotations

from typing import Annotated, Final

from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import Body, Request, Response

from server import ca
from server.api.deps import HsmDep, OriginDep, SessionDep, SettingsDep, client_address
from server.api.errors import documented_errors
from server.api.pipeline import APIRouter
from server.errors import TooLarge, UnsupportedMediaType
from server.services import enrollment, revocation, tsa

TIMESTAMP_QUERY: Final = "application/timestamp-query"
TIMESTAMP_REPLY: Final = "application/timestamp-reply"
MAX_QUERY: Final = 4096
"""Largest timestamp request taken: a request with a SHA-512 imprint, a nonce and a policy is
about 100 bytes."""

router = APIRouter(tags=["Timestamps and revocation"])


@router.post(
    "/tsa",
    response_class=Response,
    responses={
        200: {"content": {TIMESTAMP_REPLY: {}}, "description": "A DER TimeStampResp"},
        **documented_errors(400, 404, 413, 415, 429),
    },
)
def timestamp(
    request: Request,
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: OriginDep,
    body: Annotated[bytes, Body(media_type=TIMESTAMP_QUERY)],
) -> Response:
    """RFC 3161 §3.4 over HTTP: a DER ``TimeStampReq`` in, a DER ``TimeStampResp`` out (a token,
    or a rejection that names what is wrong with the request). Each client address may ask
    ``tsa_per_minute`` times a minute, on all nodes together (429 beyond)."""
    if request.headers.get("content-type", "").partition(";")[0].strip() != TIMESTAMP_QUERY:
        raise UnsupportedMediaType(f"the body must be {TIMESTAMP_QUERY}")
    if len(body) > MAX_QUERY:
        raise TooLarge(f"a timestamp request is at most {MAX_QUERY} bytes")
    answer = tsa.timestamp(session, hsm, body, policy=settings.policy, origin=origin,
                           client=client_address(request))  # fmt: skip
    return Response(answer, media_type=TIMESTAMP_REPLY)


@router.get(
    ca.CRL_PATH,
    response_class=Response,
    responses={200: {"content": {"application/pkix-crl": {}}, "description": "A DER CRL"}},
)
def crl(session: SessionDep, hsm: HsmDep, settings: SettingsDep) -> Response:
    """The CA's current CRL (DER), the distribution point of every certificate it issues."""
    der = revocation.current_crl(session, hsm, *enrollment.load_ca(settings))
    return Response(der, media_type="application/pkix-crl")


@router.get(
    ca.CA_CERT_PATH,
    response_class=Response,
    responses={200: {"content": {"application/pkix-cert": {}}, "description": "DER"}},
)
def ca_certificate(settings: SettingsDep) -> Response:
    """The CA certificate (DER), the caIssuers of every certificate it issues."""
    _, cert = enrollment.load_ca(settings)
    return Response(cert.public_bytes(Encoding.DER), media_type="application/pkix-cert")


routers = [router]
