# SPDX-License-Identifier: Apache-2.0
"""Provisioning a standalone software-key card: keys in 9A/9C/9D/9E, certificates, a CA.

``init_soft`` creates a :class:`~vcard.softkeys.SoftKeyBackend` directory, generates a key
in each of the four standard slots and issues each a certificate from a throwaway local CA.
The CA certificate is written to ``DIR/ca.pem`` so relying parties (openssl, a TLS server,
Windows logon tests) can trust the card's certificates. The CA private key is discarded
once the four certificates are signed: nothing else may ever be issued under that CA, so a
copy of the card directory cannot mint new identities.

Certificate profiles follow the slot's purpose (SP 800-73-4 Part 1 §3.1, and the
Microsoft smart-card logon requirements for 9A):

- 9A PIV Authentication: digitalSignature; EKU clientAuth + smart-card logon.
- 9C Digital Signature: digitalSignature + nonRepudiation; EKU emailProtection.
- 9D Key Management: keyEncipherment (RSA) or keyAgreement (EC); EKU emailProtection.
- 9E Card Authentication: digitalSignature; EKU id-PIV-cardAuth.

An Ed25519 card has no key agreement (X25519 is a different key), so its 9D certificate
carries digitalSignature only.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from vcard.constants import (
    TAG_CERT_INFO,
    TAG_CERTIFICATE,
    TAG_ERROR_DETECTION,
    KeyType,
    Slot,
)
from vcard.errors import NotACard
from vcard.keys import PublicKey
from vcard.softkeys import SoftKeyBackend
from vcard.tlv import Tlv

__all__ = ["CA_FILE", "STANDARD_SLOTS", "IssuedSlot", "SoftCard", "cert_object", "init_soft"]

CA_FILE: Final = "ca.pem"
STANDARD_SLOTS: Final = (
    Slot.AUTHENTICATION,
    Slot.SIGNATURE,
    Slot.KEY_MANAGEMENT,
    Slot.CARD_AUTH,
)

SMARTCARD_LOGON: Final = ObjectIdentifier("1.3.6.1.4.1.311.20.2.2")
PIV_CARD_AUTH: Final = ObjectIdentifier("2.16.840.1.101.3.6.8")

_SLOT_LABELS: Final = {
    Slot.AUTHENTICATION: "PIV Authentication",
    Slot.SIGNATURE: "Digital Signature",
    Slot.KEY_MANAGEMENT: "Key Management",
    Slot.CARD_AUTH: "Card Authentication",
}
_VALIDITY: Final = datetime.timedelta(days=3 * 365)


@dataclass(frozen=True)
class IssuedSlot:
    """One provisioned slot: its certificate (PEM-able) and its SHA-256 fingerprint."""

    slot: Slot
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


@dataclass(frozen=True)
class SoftCard:
    """What :func:`init_soft` made."""

    path: Path
    key_type: KeyType
    ca_path: Path
    slots: tuple[IssuedSlot, ...]

    def as_dict(self) -> dict[str, object]:
        """Plain data for ``--json`` (no secrets: PIN and PUK are never included)."""
        return {
            "path": str(self.path),
            "alg": self.key_type.cli_name,
            "ca": str(self.ca_path),
            "slots": [
                {
                    "slot": f"{s.slot.value:02X}",
                    "subject": s.subject,
                    "sha256": s.fingerprint,
                    "not_after": s.certificate.not_valid_after_utc.isoformat(),
                }
                for s in self.slots
            ],
        }


def cert_object(certificate: x509.Certificate) -> bytes:
    """The PIV certificate container ``{70 DER; 71 00; FE 00}`` (SP 800-73-4 Part 1 App. A).

    70 comes first and the certificate is not compressed, as ykpiv and ykcs11 2.2 require.
    """
    der = certificate.public_bytes(serialization.Encoding.DER)
    return Tlv(TAG_CERTIFICATE, der) + Tlv(TAG_CERT_INFO, b"\x00") + Tlv(TAG_ERROR_DETECTION, b"")


def init_soft(
    path: Path,
    key_type: KeyType,
    pin: bytes,
    puk: bytes,
    *,
    holder: str = "cardbridge soft card",
) -> SoftCard:
    """Create a ready software card in ``path``, all or nothing.

    The card is built in a hidden sibling directory and renamed into place at the end, so
    an interrupted run leaves no half-made card behind.

    :param path: the card directory: missing or empty.
    :param key_type: the algorithm of all four keys.
    :param pin: the initial PIN (6-8 digits).
    :param puk: the initial PUK (8 digits).
    :param holder: the cardholder name in the certificates' CN.
    """
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        try:
            SoftKeyBackend.open(path)
        except NotACard:
            raise NotACard(f"{path} exists and is not an empty directory") from None
        raise NotACard(f"{path} already holds a card")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        issued = _provision(staging, path.name, key_type, pin, puk, holder)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SoftCard(path, key_type, path / CA_FILE, issued)


def _provision(
    path: Path, name: str, key_type: KeyType, pin: bytes, puk: bytes, holder: str
) -> tuple[IssuedSlot, ...]:
    """Make the card in ``path``: backend, CA (its key dropped on return), four slots."""
    backend = SoftKeyBackend.create(path, pin=pin, puk=puk)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardbridge"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cardbridge throwaway CA for {name}"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    issued = []
    for slot in STANDARD_SLOTS:
        public_key = backend.generate_key(slot, key_type)
        cert = _issue(ca_key, ca_cert, slot, key_type, public_key, holder, now)
        backend.write_object(slot.object_id, cert_object(cert))
        issued.append(IssuedSlot(slot, cert))
    ca_path = path / CA_FILE
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(ca_path, 0o644)
    return tuple(issued)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    slot: Slot,
    key_type: KeyType,
    public_key: PublicKey,
    holder: str,
    now: datetime.datetime,
) -> x509.Certificate:
    """Sign the certificate for ``slot`` with the profile its purpose needs."""
    signing = slot is Slot.SIGNATURE
    key_management = slot is Slot.KEY_MANAGEMENT
    usage = x509.KeyUsage(
        digital_signature=not key_management or key_type is KeyType.ED25519,
        content_commitment=signing,
        key_encipherment=key_management and key_type.is_rsa,
        data_encipherment=False,
        key_agreement=key_management and key_type.is_ec,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    eku = {
        Slot.AUTHENTICATION: [ExtendedKeyUsageOID.CLIENT_AUTH, SMARTCARD_LOGON],
        Slot.SIGNATURE: [ExtendedKeyUsageOID.EMAIL_PROTECTION],
        Slot.KEY_MANAGEMENT: [ExtendedKeyUsageOID.EMAIL_PROTECTION],
        Slot.CARD_AUTH: [PIV_CARD_AUTH],
    }[slot]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardbridge"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _SLOT_LABELS[slot]),
            x509.NameAttribute(NameOID.COMMON_NAME, holder),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
