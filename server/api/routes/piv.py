"""PIV operations for the relay (``/api/v1``): PIN verify/change/unblock/status, the key
operations behind GENERAL AUTHENTICATE, the caller's credentials, and device enrollment.

All but device enrollment need a user session opened with password and TOTP.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.deps import CurrentUser, HsmDep, SessionDep, SettingsDep
from server.api.errors import documented_errors
from server.models import Credential
from server.schemas import (
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
    ResultResponse,
    RsaBlockRequest,
    b64encode,
)
from server.services import credentials, devices, pins, signing
from server.services.signing import PivOp
from server.services.tokens import Principal

_ERRORS = documented_errors(400, 401, 403, 404, 429)

pin_router = APIRouter(prefix="/api/v1/pin", tags=["PIN"], responses=_ERRORS)
key_router = APIRouter(prefix="/api/v1/credentials", tags=["PIV keys"], responses=_ERRORS)
device_router = APIRouter(prefix="/api/v1/devices", tags=["Devices"], responses=_ERRORS)


def _status(session: SessionDep, settings: SettingsDep, user: Principal) -> PinStatusResponse:
    owner = signing.piv_user(session, user)
    st = pins.status(session, owner, settings.policy)
    return PinStatusResponse(
        pin_retries=st.pin_retries,
        puk_retries=st.puk_retries,
        pin_blocked=st.pin_retries == 0,
        puk_blocked=st.puk_retries == 0,
        verified=signing.pin_verified(session, user),
    )


@pin_router.post("/verify")
def pin_verify(
    session: SessionDep, settings: SettingsDep, user: CurrentUser, body: PinVerifyRequest
) -> PinStatusResponse:
    """VERIFY: a right PIN marks this session; a wrong one costs a try (400 invalid_pin,
    ``n tries left``) and clears the mark; 403 pin_blocked when none is left."""
    signing.verify_pin(session, settings.policy, user, body.pin)
    return _status(session, settings, user)


@pin_router.post("/change", status_code=204)
def pin_change(
    session: SessionDep, settings: SettingsDep, user: CurrentUser, body: PinChangeRequest
) -> Response:
    """CHANGE REFERENCE DATA: the current PIN and a new one."""
    pins.change(session, signing.piv_user(session, user), body.pin, body.new_pin, settings.policy)
    return Response(status_code=204)


@pin_router.post("/unblock", status_code=204)
def pin_unblock(
    session: SessionDep, settings: SettingsDep, user: CurrentUser, body: PinUnblockRequest
) -> Response:
    """RESET RETRY COUNTER: the PUK sets a new PIN and resets its counter."""
    pins.unblock(session, signing.piv_user(session, user), body.puk, body.new_pin, settings.policy)
    return Response(status_code=204)


@pin_router.get("/status")
def pin_status(session: SessionDep, settings: SettingsDep, user: CurrentUser) -> PinStatusResponse:
    """Retries left for PIN and PUK, and whether this session holds a PIN verification."""
    return _status(session, settings, user)


@pin_router.post("/reset", status_code=204)
def pin_reset(session: SessionDep, user: CurrentUser) -> Response:
    """Forget this session's PIN verification (the card was reset or powered off)."""
    signing.reset_pin_state(session, user)
    return Response(status_code=204)


@key_router.get("")
def list_credentials(session: SessionDep, user: CurrentUser) -> list[DeviceCredential]:
    """The caller's active credentials: slot, algorithm and certificate (PEM)."""
    owner = signing.piv_user(session, user)
    return [_credential(c) for c in credentials.list_for_user(session, owner.id)]


def _run(
    session: SessionDep, hsm: HsmDep, user: Principal, credential_id: str, op: PivOp, data: bytes
) -> ResultResponse:
    result = signing.piv_operation(session, hsm, user, credential_id, op, data)
    return ResultResponse(result=b64encode(result))


@key_router.post("/{credential_id}/rsa-raw")
def rsa_raw(
    session: SessionDep, hsm: HsmDep, user: CurrentUser, credential_id: str, body: RsaBlockRequest
) -> ResultResponse:
    """Raw RSA on a PKCS#1 v1.5 type-1 or EMSA-PSS block of modulus length (rule 3)."""
    return _run(session, hsm, user, credential_id, PivOp.RSA_RAW, body.block)


@key_router.post("/{credential_id}/decrypt")
def decrypt(
    session: SessionDep, hsm: HsmDep, user: CurrentUser, credential_id: str, body: RsaBlockRequest
) -> ResultResponse:
    """Raw RSA decryption with the 9D key; only a type-2 result is returned (rule 3)."""
    return _run(session, hsm, user, credential_id, PivOp.DECRYPT, body.block)


@key_router.post("/{credential_id}/ecdsa")
def ecdsa(
    session: SessionDep, hsm: HsmDep, user: CurrentUser, credential_id: str, body: DigestRequest
) -> ResultResponse:
    """ECDSA on a digest as long as the curve's field; DER Ecdsa-Sig-Value out."""
    return _run(session, hsm, user, credential_id, PivOp.ECDSA, body.digest)


@key_router.post("/{credential_id}/eddsa")
def eddsa(
    session: SessionDep, hsm: HsmDep, user: CurrentUser, credential_id: str, body: MessageRequest
) -> ResultResponse:
    """Ed25519 over the whole message (RFC 8032)."""
    return _run(session, hsm, user, credential_id, PivOp.EDDSA, body.message)


@key_router.post("/{credential_id}/ecdh")
def ecdh(
    session: SessionDep, hsm: HsmDep, user: CurrentUser, credential_id: str, body: PeerPointRequest
) -> ResultResponse:
    """ECDH with the 9D key and the peer's uncompressed point; the shared secret out."""
    return _run(session, hsm, user, credential_id, PivOp.ECDH, body.peer_point)


def _credential(cred: Credential) -> DeviceCredential:
    return DeviceCredential(
        slot=cred.slot, credential_id=cred.id, alg=cred.alg, certificate=cred.cert_pem or ""
    )


@device_router.post("/enroll")
def enroll_device(
    session: SessionDep, settings: SettingsDep, body: DeviceEnrollRequest
) -> DeviceEnrollResponse:
    """Redeem a one-time enrollment code with the device's public key (PEM)."""
    result = devices.redeem(session, body.code, body.device_public_key)
    ca = settings.ca_cert.read_text() if settings.ca_cert and settings.ca_cert.exists() else ""
    return DeviceEnrollResponse(
        user=result.user,
        device_id=result.device_id,
        ca_certificate=ca,
        credentials=[_credential(c) for c in result.credentials],
    )


routers = [pin_router, key_router, device_router]
