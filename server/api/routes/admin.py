"""Administration (``/api/v1/admin``, admin token only): users (with their failed-login lock),
enrollment, revocation, PIN unblock, and CSR / certificate import for an external CA."""

from __future__ import annotations

import secrets

from fastapi import status

from server.api.deps import HsmDep, SessionDep, SettingsDep
from server.api.errors import documented_errors
from server.api.pipeline import AdminDep, APIRouter
from server.config import Policy
from server.hsm import KeyAlg
from server.models import User
from server.schemas import (
    CertImportRequest,
    CertResponse,
    CsrResponse,
    EnrolledCredential,
    EnrollRequest,
    EnrollResponse,
    Name,
    RevokeResponse,
    SlotName,
    UnblockResponse,
    UserCreate,
    UserCreated,
    UserOut,
)
from server.services import credentials, enrollment, login_limits, pins, users

router = APIRouter(
    prefix="/api/v1/admin/users",
    tags=["Administration"],
    responses=documented_errors(400, 401, 403, 404, 409),
)


def _out(session: SessionDep, policy: Policy, user: User) -> UserOut:
    failures = login_limits.name_failures(session, policy, user.name_key)
    return UserOut(
        name=user.name,
        email=user.email,
        upn=user.upn,
        disabled=user.disabled,
        enrolled=bool(credentials.list_for_user(session, user.id)),
        login_failures=failures,
        login_locked=failures >= policy.login_name_failures,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def add_user(
    session: SessionDep, settings: SettingsDep, admin: AdminDep, body: UserCreate
) -> UserCreated:
    """Create a user; without a password the server generates one and returns it once."""
    password = body.password or secrets.token_urlsafe(15)
    user = users.add_user(
        session, body.name, password=password, email=body.email, upn=body.upn, actor=admin.actor
    )
    out = _out(session, settings.policy, user)
    return UserCreated(**out.model_dump(), password=None if body.password else password)


@router.get("")
def list_users(session: SessionDep, settings: SettingsDep, _admin: AdminDep) -> list[UserOut]:
    """Every user with its state, failed logins of the current window included."""
    return [_out(session, settings.policy, u) for u in users.list_users(session)]


@router.post("/{name}/disable")
def disable_user(
    session: SessionDep, settings: SettingsDep, admin: AdminDep, name: Name
) -> UserOut:
    """No more logins or key use; the user's sessions and SADs are revoked."""
    return _out(session, settings.policy, users.disable_user(session, name, actor=admin.actor))


@router.post("/{name}/unlock")
def unlock_user(
    session: SessionDep, settings: SettingsDep, admin: AdminDep, name: Name
) -> UserOut:
    """Lift the user name's failed-login budget (``login_locked``) before its window ends."""
    return _out(session, settings.policy, users.unlock(session, name, actor=admin.actor))


@router.post("/{name}/enroll", status_code=status.HTTP_201_CREATED)
def enroll(
    session: SessionDep,
    hsm: HsmDep,
    settings: SettingsDep,
    admin: AdminDep,
    name: Name,
    body: EnrollRequest,
) -> EnrollResponse:
    """Generate the 9A/9C/9D/9E keys in the HSM, issue their certificates, set the PIN, PUK
    and TOTP secret, and create a one-time enrollment code; the secrets are shown once."""
    result = enrollment.enroll(
        session,
        hsm,
        settings,
        name,
        alg=KeyAlg(body.alg.value),
        otp_per_signature=body.otp_per_signature,
        actor=admin.actor,
    )
    return EnrollResponse(
        user=result.user,
        pin=result.pin,
        puk=result.puk,
        otp_uri=result.otp_uri,
        enrollment_code=result.enrollment_code,
        credentials=[
            EnrolledCredential(slot=c.slot, credential_id=c.credential_id, alg=c.alg)
            for c in result.credentials
        ],
    )


@router.post("/{name}/revoke")
def revoke(session: SessionDep, admin: AdminDep, name: Name) -> RevokeResponse:
    """Revoke the user's credentials, sessions, SADs, devices and unused enrollment codes."""
    return RevokeResponse(user=name, revoked=enrollment.revoke(session, name, actor=admin.actor))


@router.post("/{name}/unblock")
def unblock(
    session: SessionDep, settings: SettingsDep, admin: AdminDep, name: Name
) -> UnblockResponse:
    """Set a new random PIN and reset the PIN and PUK counters."""
    user = users.get_user(session, name)
    pin = pins.admin_unblock(session, user, settings.policy, actor=admin.actor)
    return UnblockResponse(user=name, pin=pin)


@router.post("/{name}/certs/{slot}/csr")
def cert_csr(
    session: SessionDep, hsm: HsmDep, admin: AdminDep, name: Name, slot: SlotName
) -> CsrResponse:
    """A PEM CSR for the user's key in ``slot``, signed in the HSM (for an external CA)."""
    return CsrResponse(csr=enrollment.make_csr(session, hsm, name, slot, actor=admin.actor))


@router.put("/{name}/certs/{slot}")
def cert_import(
    session: SessionDep,
    hsm: HsmDep,
    admin: AdminDep,
    name: Name,
    slot: SlotName,
    body: CertImportRequest,
) -> CertResponse:
    """Install an externally issued certificate after checking it matches the slot's key."""
    cred = enrollment.import_cert(
        session, hsm, name, slot, body.certificate.encode(), actor=admin.actor
    )
    return CertResponse(slot=cred.slot, credential_id=cred.id, certificate=cred.cert_pem or "")


routers = [router]
