"""PIV operations for the relay (``/api/v1``): PIN verify/change/unblock/status, the key
operations behind GENERAL AUTHENTICATE, the caller's credentials, the CA certificate and
device enrollment.

All but the last two need a session of an enrolled device opened with password and TOTP
(:data:`~server.api.pipeline.PivUserDep`).
"""

from __future__ import annotations

from fastapi import Response

from server.api.deps import HsmDep, OriginDep, SessionDep, SettingsDep
from server.api.errors import documented_errors
from server.api.pipeline import APIRouter, PivUserDep
from server.models import Credential, User
from server.schemas import (
    CredentialId,
    DeviceCredential,
    DeviceEnrollRequest,
    DeviceEnrollResponse,
    DigestRequest,
    MessageRequest,
    PeerPointRequest,
    PinChangeRequest,
    PinStatusResponse,
    PinUnblockRequest,
    PinVerifyRequest,
    PukChangeRequest,
    ResultResponse,
    RsaBlockRequest,
    b64encode,
)
from server.services import audit, credentials, devices, pins, piv, users
from server.services.keyuse import KeyOp
from server.services.tokens import Principal

_ERRORS = documented_errors(400, 401, 403, 404, 429)

pin_router = APIRouter(prefix="/api/v1/pin", tags=["PIN"], responses=_ERRORS)
key_router = APIRouter(prefix="/api/v1/credentials", tags=["PIV keys"], responses=_ERRORS)
device_router = APIRouter(prefix="/api/v1", tags=["Devices"], responses=_ERRORS)


def _user(session: SessionDep, principal: Principal) -> User:
    assert principal.user_id is not None  # noqa: S101 -- the pipeline admits users only
    return users.get_by_id(session, principal.user_id)


def _status(session: SessionDep, settings: SettingsDep, user: Principal) -> PinStatusResponse:
    st = pins.status(session, _user(session, user), settings.policy)
    return PinStatusResponse(
        pin_retries=st.pin_retries,
        puk_retries=st.puk_retries,
        pin_blocked=st.pin_retries == 0,
        puk_blocked=st.puk_retries == 0,
        verified=piv.pin_verified(session, user),
    )


@pin_router.post("/verify")
def pin_verify(
    session: SessionDep, settings: SettingsDep, user: PivUserDep, body: PinVerifyRequest
) -> PinStatusResponse:
    """VERIFY: a right PIN marks this session; a wrong one costs a try (400 invalid_pin with
    ``retries``) and clears the mark; 403 pin_blocked when none is left."""
    piv.verify_pin(session, settings.policy, user, body.pin)
    return _status(session, settings, user)


@pin_router.post("/change", status_code=204)
def pin_change(
    session: SessionDep, settings: SettingsDep, user: PivUserDep, body: PinChangeRequest
) -> Response:
    """CHANGE REFERENCE DATA of the PIN: the current PIN and a new one."""
    pins.change(session, _user(session, user), body.pin, body.new_pin, settings.policy)
    return Response(status_code=204)


@pin_router.post("/change-puk", status_code=204)
def puk_change(
    session: SessionDep, settings: SettingsDep, user: PivUserDep, body: PukChangeRequest
) -> Response:
    """CHANGE REFERENCE DATA of the PUK: the current PUK and a new one."""
    pins.change_puk(session, _user(session, user), body.puk, body.new_puk, settings.policy)
    return Response(status_code=204)


@pin_router.post("/unblock", status_code=204)
def pin_unblock(
    session: SessionDep, settings: SettingsDep, user: PivUserDep, body: PinUnblockRequest
) -> Response:
    """RESET RETRY COUNTER: the PUK sets a new PIN and resets its counter."""
    pins.unblock(session, _user(session, user), body.puk, body.new_pin, settings.policy)
    return Response(status_code=204)


@pin_router.get("/status")
def pin_status(session: SessionDep, settings: SettingsDep, user: PivUserDep) -> PinStatusResponse:
    """Retries left for PIN and PUK, and whether this session holds a PIN verification."""
    return _status(session, settings, user)


@pin_router.post("/reset", status_code=204)
def pin_reset(session: SessionDep, user: PivUserDep) -> Response:
    """Forget this session's PIN verification (the card was reset or powered off)."""
    piv.reset_pin_state(session, user)
    return Response(status_code=204)


@key_router.get("")
def list_credentials(session: SessionDep, user: PivUserDep) -> list[DeviceCredential]:
    """The caller's active credentials: slot, algorithm, certificate (PEM) and policy."""
    assert user.user_id is not None  # noqa: S101 -- the pipeline admits users only
    return [_credential(c) for c in credentials.list_for_user(session, user.user_id)]


def _run(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: audit.Origin,
    user: Principal,
    credential_id: CredentialId,
    op: KeyOp,
    data: bytes,
    otp: str | None,
) -> ResultResponse:
    result = piv.operation(
        session, hsm, settings.policy, user, credential_id, op, data, origin=origin, otp=otp
    )
    return ResultResponse(result=b64encode(result))


@key_router.post("/{credential_id}/rsa-raw")
def rsa_raw(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: OriginDep,
    user: PivUserDep,
    credential_id: CredentialId,
    body: RsaBlockRequest,
) -> ResultResponse:
    """Raw RSA on a PKCS#1 v1.5 type-1 or EMSA-PSS block of modulus length (rule 3)."""
    return _run(
        session, hsm, settings, origin, user, credential_id, KeyOp.RSA_RAW, body.block, body.otp
    )


@key_router.post("/{credential_id}/decrypt")
def decrypt(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: OriginDep,
    user: PivUserDep,
    credential_id: CredentialId,
    body: RsaBlockRequest,
) -> ResultResponse:
    """Raw RSA decryption with the 9D key, within its decryption budget (429
    ``decryption_budget_exhausted``); the answer is always a type-2 block of modulus length,
    the real message's or a synthetic one (implicit rejection: no padding oracle, rule 3)."""
    return _run(
        session, hsm, settings, origin, user, credential_id, KeyOp.DECRYPT, body.block, body.otp
    )


@key_router.post("/{credential_id}/ecdsa")
def ecdsa(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: OriginDep,
    user: PivUserDep,
    credential_id: CredentialId,
    body: DigestRequest,
) -> ResultResponse:
    """ECDSA on a digest as long as the curve's field; DER Ecdsa-Sig-Value out."""
    return _run(
        session, hsm, settings, origin, user, credential_id, KeyOp.ECDSA, body.digest, body.otp
    )


@key_router.post("/{credential_id}/eddsa")
def eddsa(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: OriginDep,
    user: PivUserDep,
    credential_id: CredentialId,
    body: MessageRequest,
) -> ResultResponse:
    """Ed25519 over the whole message (RFC 8032)."""
    return _run(
        session, hsm, settings, origin, user, credential_id, KeyOp.EDDSA, body.message, body.otp
    )


@key_router.post("/{credential_id}/ecdh")
def ecdh(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    origin: OriginDep,
    user: PivUserDep,
    credential_id: CredentialId,
    body: PeerPointRequest,
) -> ResultResponse:
    """ECDH with the 9D key and the peer's uncompressed point; the shared secret out."""
    return _run(
        session, hsm, settings, origin, user, credential_id, KeyOp.ECDH, body.peer_point, body.otp
    )


def _credential(cred: Credential) -> DeviceCredential:
    return DeviceCredential(
        slot=cred.slot,
        credential_id=cred.id,
        alg=cred.alg,
        certificate=cred.cert_pem or "",
        pin_always=cred.pin_always,
        otp_per_signature=cred.otp_per_signature,
    )


@device_router.get("/ca", response_class=Response, responses={200: {"content": {
    "application/x-pem-file": {}}}})  # fmt: skip
def ca_certificate(settings: SettingsDep) -> Response:
    """The deployment's CA certificate (PEM). Public: a new device compares its SHA-256 with
    the one its enrollment code carries before it trusts this server with anything."""
    return Response(settings.ca_cert.read_bytes(), media_type="application/x-pem-file")


@device_router.post("/devices/enroll")
def enroll_device(
    session: SessionDep, settings: SettingsDep, body: DeviceEnrollRequest
) -> DeviceEnrollResponse:
    """Redeem a one-time enrollment code with the device's public key (PEM)."""
    result = devices.redeem(session, body.code, body.device_public_key)
    return DeviceEnrollResponse(
        user=result.user,
        device_id=result.device_id,
        ca_certificate=settings.ca_cert.read_text(),
        credentials=[_credential(c) for c in result.credentials],
    )


routers = [key_router, pin_router, device_router]
