# SPDX-License-Identifier: Apache-2.0
"""Enrollment: a user's PIV keys generated in the HSM, their certificates, PIN, PUK, TOTP and a
one-time enrollment code; revocation; CSR and certificate import for an external CA.

No partial writes (rule 8): if any HSM or CA step fails, the keys generated so far are destroyed
and the error rolls the request's transaction back.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import update
from sqlalchemy.orm import Session

from server import ca
from server.config import Settings
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, ServerError
from server.hsm import Hsm, KeyAlg, KeyRef
from server.models import Credential, Device, EnrollmentCode, utcnow
from server.services import audit, credentials, otp, pins, users
from server.services.credentials import ACTIVE, REVOKED
from server.services.hashing import new_token, token_digest

PIN_LEN = 6
KEY_AGREEMENT_FALLBACK = KeyAlg.P256
"""9D must decrypt or agree keys; Ed25519 can do neither, so an Ed25519 enrollment gets P-256
there (SoftHSM has no X25519)."""


@dataclass(frozen=True)
class EnrolledCredential:
    slot: str
    credential_id: str
    alg: str


@dataclass(frozen=True)
class EnrollmentResult:
    """What ``admin enroll`` prints; PIN, PUK and code are shown once and never stored. The
    code is ``SECRET.CAPIN``: the secret redeems it once, :func:`ca_pin` pins the CA."""

    user: str
    pin: str
    puk: str
    otp_uri: str
    enrollment_code: str
    credentials: list[EnrolledCredential] = field(default_factory=list)


def load_ca(settings: Settings) -> tuple[KeyRef, x509.Certificate]:
    """The built-in CA's HSM key and certificate, as ``server init`` recorded them."""
    if settings.ca_key_id is None or settings.ca_key_alg is None or not settings.ca_cert.exists():
        raise ServerError("the data directory has no CA: run `cardbridge server init`")
    cert = x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
    return KeyRef(settings.ca_key_id, KeyAlg(settings.ca_key_alg)), cert


def ca_pin(ca_cert: x509.Certificate) -> str:
    """What an enrollment code carries after its dot: base64url (RFC 4648 §5, unpadded) of the
    SHA-256 of the CA certificate (DER), so the device can check the server before it sends the
    code (as a kubeadm join token pins the cluster's CA)."""
    digest = hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _slot_alg(alg: KeyAlg, slot: str) -> KeyAlg:
    return KEY_AGREEMENT_FALLBACK if slot == "9d" and alg == KeyAlg.ED25519 else alg


def enroll(
    session: Session,
    hsm: Hsm,
    settings: Settings,
    name: str,
    *,
    alg: KeyAlg = KeyAlg.P256,
    otp_per_signature: bool = False,
    actor: str = "admin",
) -> EnrollmentResult:
    """Enroll ``name``: keys for 9A/9C/9D/9E, certificates from the built-in CA, PIN, PUK,
    TOTP secret and a one-time enrollment code.

    Only the 9D key may decrypt or agree keys: 9A, 9C and 9E keys are generated sign-only, so
    the HSM itself refuses anything else with them (rule 3). ``otp_per_signature`` applies to
    the 9C (digital signature) credential; ``pin_always`` comes from the policy and applies to
    9C too.

    :raises Conflict: the user already has active credentials (revoke first).
    :raises Forbidden: the user is disabled.
    """
    policy = settings.policy
    user = users.get_user(session, name)
    if user.disabled:
        raise Forbidden(f"user {name!r} is disabled")
    if credentials.list_for_user(session, user.id):
        raise Conflict(f"user {name!r} is already enrolled; revoke first")
    ca_ref, ca_cert = load_ca(settings)
    generated: list[KeyRef] = []
    enrolled: list[EnrolledCredential] = []
    try:
        for slot in ca.SLOTS:
            slot_alg = _slot_alg(alg, slot)
            cred_id = new_token()[:22]
            ref = hsm.generate_key(slot_alg, f"{name}/{slot}/{cred_id}", sign_only=slot != "9d")
            generated.append(ref)
            cert = ca.issue_slot_cert(
                hsm, ca_ref, ca_cert, slot, hsm.public_key(ref), name, user.email, user.upn,
                base_url=settings.base_url,
            )  # fmt: skip
            session.add(
                Credential(
                    id=cred_id,
                    user_id=user.id,
                    slot=slot,
                    alg=str(slot_alg),
                    key_id=ref.key_id,
                    cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                    status=ACTIVE,
                    otp_per_signature=otp_per_signature and slot == "9c",
                    pin_always=policy.pin_always and slot == "9c",
                )
            )
            enrolled.append(EnrolledCredential(slot, cred_id, str(slot_alg)))
        pin, puk = pins.random_digits(PIN_LEN), pins.random_digits(pins.PUK_LEN)
        pins.set_initial(user, pin, puk, policy)
        secret = otp.new_secret(session, user)
        code_secret = new_token()[:24]
        code = f"{code_secret}.{ca_pin(ca_cert)}"
        session.add(
            EnrollmentCode(
                code_hash=token_digest(code_secret),
                user_id=user.id,
                expires_at=utcnow() + policy.ttl("enrollment_code_ttl"),
            )
        )
        audit.append(
            session,
            actor=actor,
            event=audit.Event.ENROLL,
            subject=f"user:{name}",
            details={
                "alg": str(alg),
                "otp_per_signature": otp_per_signature,
                "credentials": {c.slot: c.credential_id for c in enrolled},
            },
        )
        session.flush()
    except BaseException:
        for ref in generated:
            try:
                hsm.destroy_key(ref)
            except ServerError:  # best effort: the key is orphaned but has no owner
                pass
        raise
    return EnrollmentResult(name, pin, puk, otp.otpauth_uri(user, secret), code, enrolled)


def revoke(session: Session, name: str, *, actor: str = "admin") -> int:
    """Revoke every credential of ``name`` with its sessions, SADs, devices and unused
    enrollment codes; returns the number of credentials revoked. Keys stay in the HSM
    (a 9D key may still be needed to recover old mail) but are never used again; their
    certificates are on the next CRL (:mod:`server.services.revocation`).
    """
    user = users.get_user(session, name)
    creds = credentials.list_for_user(session, user.id)
    now = utcnow()
    for cred in creds:
        cred.status, cred.revoked_at = REVOKED, now
    users.revoke_sessions(session, user.id)
    session.execute(update(Device).where(Device.user_id == user.id).values(revoked=True))
    session.execute(
        update(EnrollmentCode)
        .where(EnrollmentCode.user_id == user.id, EnrollmentCode.used_at.is_(None))
        .values(used_at=utcnow())
    )
    audit.append(
        session,
        actor=actor,
        event=audit.Event.REVOKE,
        subject=f"user:{name}",
        details={"credentials": [c.id for c in creds]},
    )
    return len(creds)


def _slot(slot: str) -> str:
    s = slot.lower()
    if s not in ca.SLOTS:
        raise NotFound(f"unknown slot {slot!r} (one of {', '.join(ca.SLOTS)})")
    return s


def make_csr(session: Session, hsm: Hsm, name: str, slot: str, *, actor: str = "admin") -> str:
    """A PEM CSR for the user's key in ``slot``, signed in the HSM (for an external CA)."""
    user = users.get_user(session, name)
    cred = credentials.get_by_slot(session, user, _slot(slot))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = ca.build_csr(hsm, credentials.key_ref(cred), subject)
    audit.append(session, actor=actor, event=audit.Event.CERT_CSR, subject=f"credential:{cred.id}")
    pem: bytes = csr.public_bytes(serialization.Encoding.PEM)
    return pem.decode()


def import_cert(
    session: Session, hsm: Hsm, name: str, slot: str, cert_pem: bytes, *, actor: str = "admin"
) -> Credential:
    """Install an externally issued certificate after checking it matches the slot's key.

    :raises InvalidRequest: not a PEM/DER certificate, or for another key.
    """
    user = users.get_user(session, name)
    cred = credentials.get_by_slot(session, user, _slot(slot))
    try:
        if b"-----BEGIN" in cert_pem:
            cert = x509.load_pem_x509_certificate(cert_pem)
        else:
            cert = x509.load_der_x509_certificate(cert_pem)
    except ValueError as e:
        raise InvalidRequest("not an X.509 certificate") from e
    ca.check_cert_matches(cert, hsm.public_key(credentials.key_ref(cred)))
    cred.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    audit.append(
        session,
        actor=actor,
        event=audit.Event.CERT_IMPORT,
        subject=f"credential:{cred.id}",
        details={"serial": format(cert.serial_number, "x"), "issuer": cert.issuer.rfc4514_string()},
    )
    return cred
