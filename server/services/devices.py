# SPDX-License-Identifier: Apache-2.0
"""Devices: a workstation redeems a one-time enrollment code with its device public key, whose
DPoP proofs (RFC 9449) then come with each of its requests (:mod:`server.services.dpop`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Conflict, Forbidden, InvalidRequest, NotFound
from server.models import Credential, Device, EnrollmentCode, User, utcnow
from server.services import audit, credentials, dpop
from server.services.hashing import new_token, token_digest


@dataclass(frozen=True)
class DeviceEnrollment:
    """What a device gets for a valid code: its id, its user and the user's credentials."""

    device_id: str
    user: str
    credentials: list[Credential]


@dataclass(frozen=True)
class _DeviceKey:
    pem: str
    fingerprint: str
    """SHA-256 (hex) of the SubjectPublicKeyInfo."""
    jkt: str
    """JWK SHA-256 thumbprint (RFC 7638), what DPoP proofs name."""


def _load_public_key(pem: str) -> _DeviceKey:
    """A device key, which signs DPoP proofs: P-256 (ES256), P-384 (ES384) or Ed25519."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as e:
        raise InvalidRequest("device_public_key is not a PEM public key") from e
    if not (
        isinstance(key, ec.EllipticCurvePublicKey)
        and key.curve.name in ("secp256r1", "secp384r1")
        or isinstance(key, ed25519.Ed25519PublicKey)
    ):
        raise InvalidRequest("device keys are P-256, P-384 or Ed25519")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem_out = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return _DeviceKey(
        pem_out, hashlib.sha256(der).hexdigest(), dpop.thumbprint(dpop.public_jwk(key))
    )


def redeem(session: Session, code: str, device_public_key_pem: str) -> DeviceEnrollment:
    """Spend an enrollment code (once, atomically) and register the device key.

    :param code: the code's secret, or the whole code as ``admin enroll`` printed it (the part
        after the dot pins the CA, for the device's own use).

    :raises InvalidRequest: bad key, or an unknown, expired or used code (not told apart).
    :raises Conflict: this device key is already registered.
    """
    key = _load_public_key(device_public_key_pem)
    if session.scalar(select(Device.id).where(Device.fingerprint == key.fingerprint)) is not None:
        raise Conflict("this device key is already registered")
    row = session.execute(
        update(EnrollmentCode)
        .where(
            EnrollmentCode.code_hash == token_digest(code.split(".", 1)[0]),
            EnrollmentCode.used_at.is_(None),
            EnrollmentCode.expires_at > utcnow(),
        )
        .values(used_at=utcnow())
        .returning(EnrollmentCode.user_id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        raise InvalidRequest("invalid, expired or already used enrollment code")
    user = session.get(User, int(row[0]))
    if user is None or user.disabled:
        raise Forbidden("the user is disabled")
    device = Device(
        id=new_token()[:22],
        user_id=user.id,
        public_key_pem=key.pem,
        fingerprint=key.fingerprint,
        jkt=key.jkt,
    )
    session.add(device)
    try:
        session.flush()
    except IntegrityError as e:  # the same key registered concurrently
        raise Conflict("this device key is already registered") from e
    audit.append(
        session,
        actor=f"device:{device.id}",
        event=audit.Event.DEVICE_ENROLL,
        subject=f"user:{user.name}",
        details={"fingerprint": key.fingerprint},
    )
    return DeviceEnrollment(device.id, user.name, credentials.list_for_user(session, user.id))


def get_device(session: Session, device_id: str) -> Device:
    """The registered, unrevoked device ``device_id``.

    :raises NotFound: unknown device.
    :raises Forbidden: revoked device or disabled user.
    """
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound("unknown device")
    user = session.get(User, device.user_id)
    if device.revoked or user is None or user.disabled:
        raise Forbidden("the device is revoked")
    return device
