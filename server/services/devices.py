# SPDX-License-Identifier: Apache-2.0
"""Devices: a workstation redeems a one-time enrollment code with its device public key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Conflict, Forbidden, InvalidRequest, NotFound
from server.models import Credential, Device, EnrollmentCode, User, utcnow
from server.services import audit, credentials
from server.services.hashing import new_token, token_digest

MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class DeviceEnrollment:
    """What a device gets for a valid code: its id, its user and the user's credentials."""

    device_id: str
    user: str
    credentials: list[Credential]


def _load_public_key(pem: str) -> tuple[str, str]:
    """Normalised PEM and SHA-256 (hex) of the SubjectPublicKeyInfo of a device key."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as e:
        raise InvalidRequest("device_public_key is not a PEM public key") from e
    ok = (
        isinstance(key, ec.EllipticCurvePublicKey)
        and key.curve.name in ("secp256r1", "secp384r1")
        or isinstance(key, ed25519.Ed25519PublicKey)
        or isinstance(key, rsa.RSAPublicKey)
        and key.key_size >= MIN_RSA_BITS
    )
    if not ok:
        raise InvalidRequest("device keys are P-256, P-384, Ed25519 or RSA >= 2048")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem_out = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return pem_out, hashlib.sha256(der).hexdigest()


def redeem(session: Session, code: str, device_public_key_pem: str) -> DeviceEnrollment:
    """Spend an enrollment code (once, atomically) and register the device key.

    :raises InvalidRequest: bad key, or an unknown, expired or used code (not told apart).
    :raises Conflict: this device key is already registered.
    """
    pem, fingerprint = _load_public_key(device_public_key_pem)
    if session.scalar(select(Device.id).where(Device.fingerprint == fingerprint)) is not None:
        raise Conflict("this device key is already registered")
    row = session.execute(
        update(EnrollmentCode)
        .where(
            EnrollmentCode.code_hash == token_digest(code),
            EnrollmentCode.used_at.is_(None),
            EnrollmentCode.expires_at > utcnow(),
        )
        .values(used_at=utcnow())
        .returning(EnrollmentCode.user_id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        session.rollback()
        raise InvalidRequest("invalid, expired or already used enrollment code")
    user = session.get(User, int(row[0]))
    if user is None or user.disabled:
        session.rollback()
        raise Forbidden("the user is disabled")
    device = Device(
        id=new_token()[:22], user_id=user.id, public_key_pem=pem, fingerprint=fingerprint
    )
    session.add(device)
    try:
        session.flush()
    except IntegrityError as e:  # the same key registered concurrently
        session.rollback()
        raise Conflict("this device key is already registered") from e
    audit.append(
        session,
        actor=f"device:{device.id}",
        event=audit.Event.DEVICE_ENROLL,
        subject=f"user:{user.name}",
        details={"fingerprint": fingerprint},
    )
    session.commit()
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
