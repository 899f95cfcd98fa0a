# SPDX-License-Identifier: Apache-2.0
"""Enrollment against the real SoftHSM2 token and CA: keys per slot, certificates, PIN/PUK,
TOTP, one-time codes redeemed by a device; revocation; CSR and certificate import."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import pyotp
import pytest
from conftest import PASSWORD
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from server import ca
from server.config import Settings
from server.db import unit_of_work
from server.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    ServerError,
    Unauthorized,
)
from server.hsm import Hsm, KeyAlg, KeyRef
from server.models import Credential, User
from server.services import audit, credentials, devices, enrollment, keyuse, pins, tokens, users


@pytest.fixture
def settings(hsm: Hsm, tmp_path: Path, db_url: str) -> Settings:
    ca_ref, ca_cert = ca.create_ca(hsm, "test CA", label=f"ca:{secrets.token_hex(4)}")
    s = Settings.for_data_dir(
        tmp_path, db_url=db_url, ca_key_id=ca_ref.key_id, ca_key_alg=str(ca_ref.alg)
    )
    s.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return s


PEER_POINT = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
)


def device_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.hsm
def test_enroll_p256_then_redeem_and_revoke(session: Session, hsm: Hsm, settings: Settings) -> None:
    users.add_user(
        session, "dora", password=PASSWORD, email="dora@example.org", upn="dora@corp.example"
    )
    result = enrollment.enroll(session, hsm, settings, "dora", otp_per_signature=True)

    assert [c.slot for c in result.credentials] == ["9a", "9c", "9d", "9e"]
    assert len(result.pin) == 6 and len(result.puk) == 8
    assert result.otp_uri.startswith("otpauth://totp/")
    ca_cert = x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
    user = users.get_user(session, "dora")
    for cred in credentials.list_for_user(session, user.id):
        cert = x509.load_pem_x509_certificate((cred.cert_pem or "").encode())
        cert.verify_directly_issued_by(ca_cert)
        ca.check_cert_matches(cert, hsm.public_key(credentials.key_ref(cred)))
        assert cred.otp_per_signature == (cred.slot == "9c")
        if cred.slot != "9d":  # only the key-management key may agree keys (rule 3)
            with pytest.raises(ServerError):
                hsm.ecdh(credentials.key_ref(cred), PEER_POINT)
        else:
            assert len(hsm.ecdh(credentials.key_ref(cred), PEER_POINT)) == 32
        assert cred.pin_always == (cred.slot == "9c")
    nine_a = credentials.get_by_slot(session, user, "9a")
    eku = x509.load_pem_x509_certificate((nine_a.cert_pem or "").encode()).extensions
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH in eku.get_extension_for_class(x509.ExtendedKeyUsage).value
    )

    # the PIN, PUK and TOTP handed out work, and nothing secret went into the audit log
    pins.verify(session, user, result.pin, settings.policy)
    secret = pyotp.parse_uri(result.otp_uri).secret
    tokens.login(session, settings.policy, "dora", PASSWORD, pyotp.TOTP(secret).now(),
                 address="192.0.2.1")
    dump = str(list(audit.export(session)))
    for value in (result.pin, result.puk, secret, result.enrollment_code, PASSWORD):
        assert value not in dump

    with pytest.raises(Conflict):
        enrollment.enroll(session, hsm, settings, "dora")

    got = devices.redeem(session, result.enrollment_code, device_key_pem())
    assert got.user == "dora" and [c.slot for c in got.credentials] == ["9a", "9c", "9d", "9e"]
    assert devices.get_device(session, got.device_id).user_id == user.id
    with pytest.raises(InvalidRequest):  # one time only
        devices.redeem(session, result.enrollment_code, device_key_pem())

    pair = tokens.login(
        session,
        settings.policy,
        "dora",
        PASSWORD,
        pyotp.TOTP(secret).at(time.time() + 30),
        address="192.0.2.1",
    )
    assert enrollment.revoke(session, "dora") == 4
    assert credentials.list_for_user(session, user.id) == []
    with pytest.raises(Forbidden):
        keyuse.key_use(session, user.id, nine_a.id)
    with pytest.raises(Unauthorized):
        tokens.authenticate(session, pair.access_token)
    with pytest.raises(Forbidden):
        devices.get_device(session, got.device_id)
    # keys stay in the HSM but a new enrollment gets new ones
    again = enrollment.enroll(session, hsm, settings, "dora", alg=KeyAlg.ED25519)
    algs = {c.slot: c.alg for c in again.credentials}
    assert algs == {"9a": "ed25519", "9c": "ed25519", "9d": "p256", "9e": "ed25519"}


@pytest.mark.hsm
def test_credentials_are_scoped_to_their_owner(
    session: Session, hsm: Hsm, settings: Settings
) -> None:
    users.add_user(session, "erin")
    users.add_user(session, "fred")
    enrollment.enroll(session, hsm, settings, "erin")
    erin, fred = users.get_user(session, "erin"), users.get_user(session, "fred")
    cred = credentials.get_by_slot(session, erin, "9c")
    assert keyuse.key_use(session, erin.id, cred.id).id == cred.id
    with pytest.raises(NotFound):
        keyuse.key_use(session, fred.id, cred.id)
    users.disable_user(session, "fred")
    with pytest.raises(Forbidden):
        enrollment.enroll(session, hsm, settings, "fred")


@pytest.mark.hsm
def test_csr_and_certificate_import(session: Session, hsm: Hsm, settings: Settings) -> None:
    users.add_user(session, "gus")
    enrollment.enroll(session, hsm, settings, "gus", alg=KeyAlg.RSA2048)
    csr = x509.load_pem_x509_csr(enrollment.make_csr(session, hsm, "gus", "9C").encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gus"

    # an "external CA" issues a certificate for the CSR's key
    ext_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "external CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(name)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now.replace(year=now.year + 1))
        .sign(ext_key, hashes.SHA256())
    )
    imported = enrollment.import_cert(
        session, hsm, "gus", "9c", cert.public_bytes(serialization.Encoding.DER)
    )
    assert x509.load_pem_x509_certificate((imported.cert_pem or "").encode()) == cert
    with pytest.raises(InvalidRequest):  # the 9A key is another key
        enrollment.import_cert(
            session, hsm, "gus", "9a", cert.public_bytes(serialization.Encoding.PEM)
        )
    with pytest.raises(InvalidRequest):
        enrollment.import_cert(session, hsm, "gus", "9a", b"not a certificate")
    with pytest.raises(NotFound):
        enrollment.make_csr(session, hsm, "gus", "9b")


@pytest.mark.hsm
def test_failed_enrollment_leaves_nothing(
    session: Session, hsm: Hsm, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    users.add_user(session, "hal")
    session.commit()
    made: list[KeyRef] = []
    real = hsm.generate_key

    def generate(alg: KeyAlg, label: str, **kw: bool) -> KeyRef:
        ref = real(alg, label, **kw)
        made.append(ref)
        return ref

    def broken_ca(*args: object, **kw: object) -> x509.Certificate:
        if len(made) == 3:
            raise InvalidRequest("CA refused")
        return real_issue(*args, **kw)  # type: ignore[arg-type]

    real_issue = ca.issue_slot_cert
    monkeypatch.setattr(hsm, "generate_key", generate)
    monkeypatch.setattr(ca, "issue_slot_cert", broken_ca)
    with pytest.raises(InvalidRequest), unit_of_work(session):
        enrollment.enroll(session, hsm, settings, "hal")
    assert session.scalars(select(Credential)).all() == []
    assert session.scalars(select(User.pin_hash).where(User.name == "hal")).one() is None
    assert len(made) == 3
    for ref in made:  # the keys generated before the failure are gone from the HSM
        with pytest.raises(NotFound):
            hsm.destroy_key(ref)


@pytest.mark.parametrize(
    "pem",
    [
        "garbage",
        ec.generate_private_key(ec.SECP192R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    ],
)
def test_bad_device_keys(session: Session, pem: str) -> None:
    with pytest.raises(InvalidRequest):
        devices.redeem(session, "whatever", pem)


def test_unknown_code(session: Session) -> None:
    with pytest.raises(InvalidRequest):
        devices.redeem(session, "no-such-code", device_key_pem())
