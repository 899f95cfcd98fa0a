# SPDX-License-Identifier: Apache-2.0
"""The built-in CA (its key in the HSM) and the certificate profiles of the PIV slots.

Profiles (SP 800-73-4 / FIPS 201-3 usage, Microsoft smart-card logon requirements):

- 9A authentication: digitalSignature; EKU clientAuth + smartcardLogon
  (1.3.6.1.4.1.311.20.2.2); SAN UPN otherName (1.3.6.1.4.1.311.20.2.3) and e-mail.
- 9C digital signature: digitalSignature + nonRepudiation; EKU emailProtection; SAN e-mail.
- 9D key management: keyEncipherment (RSA) or keyAgreement (EC); EKU emailProtection.
- 9E card authentication: digitalSignature; EKU id-PIV-cardAuth (2.16.840.1.101.3.6.8).
- the time-stamping authority (RFC 3161 §2.3): digitalSignature; EKU timeStamping, critical.

Every certificate it issues names where its revocation status and its issuer are published
(RFC 5280 §4.2.1.13 CRL distribution point, §4.2.2.1 authority information access):
``{base_url}/crl`` and ``{base_url}/ca.crt``, so a validator that fetches nothing else can check
a signature for the long term (ETSI EN 319 102-1). :func:`build_crl` signs the CRL with the CA
key in the HSM.

For an external CA, :func:`build_csr` makes a CSR signed in the HSM and
:func:`check_cert_matches` refuses an issued certificate that is not for the slot's key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from typing import Final

from asn1crypto.core import UTF8String
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
    ObjectIdentifier,
)

from server.algorithms import KeyAlg
from server.errors import Conflict, HsmError, InvalidRequest, NotFound
from server.hsm.keys import HsmPrivateKey, private_key
from server.hsm.pkcs11 import Hsm, KeyRef, PublicKey

OID_SMARTCARD_LOGON: Final = ObjectIdentifier("1.3.6.1.4.1.311.20.2.2")
OID_UPN: Final = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
OID_PIV_CARD_AUTH: Final = ObjectIdentifier("2.16.840.1.101.3.6.8")
CRL_PATH: Final = "/crl"
CA_CERT_PATH: Final = "/ca.crt"
TSA_NAME: Final = "cardbridge TSA"

CA_DAYS: Final = 3650
TLS_DAYS: Final = 825
SLOT_DAYS: Final = 730
SLOTS: Final = ("9a", "9c", "9d", "9e")
"""PIV authentication, digital signature, key management, card authentication."""
_BACKDATE: Final = dt.timedelta(minutes=5)


def _hash_for(key: HsmPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The signature hash that matches the CA key's strength (None for Ed25519)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )
    return x509.KeyUsage(**{n: flags.get(n, False) for n in names})


def _validity(
    builder: x509.CertificateBuilder, days: int, until: dt.datetime | None = None
) -> x509.CertificateBuilder:
    """Valid from now (backdated a little) for ``days``, but not after ``until``."""
    now = dt.datetime.now(dt.UTC)
    end = now + dt.timedelta(days=days)
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(min(end, until or end))


def _sign(builder: x509.CertificateBuilder, hsm: Hsm, ca_ref: KeyRef) -> x509.Certificate:
    key = private_key(hsm, ca_ref)
    return builder.sign(key, _hash_for(key))


def create_ca(
    hsm: Hsm, name: str, *, alg: KeyAlg = KeyAlg.P256, label: str | None = None
) -> tuple[KeyRef, x509.Certificate]:
    """Generate the CA key in the HSM and its self-signed certificate (10 years, pathlen 0).

    :param name: the CA's common name.
    :param label: the HSM label of the CA key (default ``ca:<name>``; must be unused).
    """
    ref = hsm.generate_key(alg, label or f"ca:{name}")
    public_key = hsm.public_key(ref)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return ref, _sign(_validity(builder, CA_DAYS), hsm, ca_ref=ref)


def _issued(
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: PublicKey,
    days: int,
    base_url: str,
) -> x509.CertificateBuilder:
    """A builder for an end-entity certificate under ``ca_cert`` that names the CRL and the CA
    certificate under ``base_url`` (module docstring); it never outlives the CA."""
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    crl = x509.UniformResourceIdentifier(base_url + CRL_PATH)
    issuer = x509.UniformResourceIdentifier(base_url + CA_CERT_PATH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.CRLDistributionPoints([x509.DistributionPoint([crl], None, None, None)]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityInformationAccess(
                [x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, issuer)]
            ),
            critical=False,
        )
    )
    return _validity(builder, days, until=ca_cert.not_valid_after_utc)


def issue_tls_cert(
    hsm: Hsm, ca_ref: KeyRef, ca_cert: x509.Certificate, names: Sequence[str], *, base_url: str
) -> tuple[x509.Certificate, bytes]:
    """Issue the server's TLS certificate for DNS names and IP addresses.

    The TLS key is a software P-256 key because uvicorn reads it from a file: the caller
    writes the returned unencrypted PKCS#8 PEM with mode 0600.
    """
    if not names:
        raise InvalidRequest("A TLS certificate needs at least one host name or address")
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = (
        _issued(ca_cert, subject, key.public_key(), TLS_DAYS, base_url)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _sign(builder, hsm, ca_ref), pem


def issue_slot_cert(
    hsm: Hsm,
    ca_ref: KeyRef,
    ca_cert: x509.Certificate,
    slot: str,
    public_key: PublicKey,
    subject_name: str,
    email: str | None = None,
    upn: str | None = None,
    *,
    base_url: str,
) -> x509.Certificate:
    """Issue the certificate of one PIV slot with that slot's profile (module docstring).

    :param slot: ``9a``, ``9c``, ``9d`` or ``9e``.
    :param base_url: where the CRL and the CA certificate are published.
    :param subject_name: the subject's common name (the user name).
    :param email: rfc822Name in the SAN of 9A, 9C and 9D.
    :param upn: Microsoft UPN otherName in the SAN of 9A (Windows logon).
    """
    slot = slot.lower()
    eku: list[ObjectIdentifier]
    if slot == "9a":
        usage = _key_usage(digital_signature=True)
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH, OID_SMARTCARD_LOGON]
    elif slot == "9c":
        usage = _key_usage(digital_signature=True, content_commitment=True)
        eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    elif slot == "9d":
        if isinstance(public_key, rsa.RSAPublicKey):
            usage = _key_usage(key_encipherment=True)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            usage = _key_usage(key_agreement=True)
        else:
            raise InvalidRequest("A 9D key must be RSA or EC (Ed25519 cannot decrypt)")
        eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    elif slot == "9e":
        usage = _key_usage(digital_signature=True)
        eku = [OID_PIV_CARD_AUTH]
    else:
        raise InvalidRequest(f"Unknown PIV slot {slot!r}; expected one of {', '.join(SLOTS)}")
    alt_names: list[x509.GeneralName] = []
    if slot == "9a" and upn:
        alt_names.append(x509.OtherName(OID_UPN, UTF8String(upn).dump()))
    if slot != "9e" and email:
        alt_names.append(x509.RFC822Name(email))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name)])
    builder = (
        _issued(ca_cert, subject, public_key, SLOT_DAYS, base_url)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return _sign(builder, hsm, ca_ref)


def issue_tsa_cert(
    hsm: Hsm, ca_ref: KeyRef, ca_cert: x509.Certificate, public_key: PublicKey, *, base_url: str
) -> x509.Certificate:
    """Issue the time-stamping authority's certificate: digitalSignature and the critical EKU
    timeStamping and nothing else (RFC 3161 §2.3), valid as long as the CA."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TSA_NAME)])
    builder = (
        _issued(ca_cert, subject, public_key, CA_DAYS, base_url)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
    )
    return _sign(builder, hsm, ca_ref)


def build_crl(
    hsm: Hsm,
    ca_ref: KeyRef,
    ca_cert: x509.Certificate,
    *,
    number: int,
    revoked: Sequence[tuple[int, dt.datetime]],
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """A complete CRL of the CA (RFC 5280 §5): ``revoked`` as (serial number, revocation time),
    with the cRLNumber and authorityKeyIdentifier extensions the profile requires, signed by
    the CA key in the HSM."""
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    key = private_key(hsm, ca_ref)
    return builder.sign(key, _hash_for(key))


def build_csr(hsm: Hsm, ref: KeyRef, subject: x509.Name) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for an HSM key, signed in the HSM, for an external CA."""
    key = private_key(hsm, ref)
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, _hash_for(key))


def check_cert_matches(cert: x509.Certificate, public_key: PublicKey) -> None:
    """Refuse a certificate whose public key is not ``public_key`` (``cert import``)."""
    if _spki(cert.public_key()) != _spki(public_key):
        raise InvalidRequest("The certificate does not match the slot's key")


def require_ca_key(hsm: Hsm, ca_ref: KeyRef, ca_cert: x509.Certificate) -> None:
    """Refuse a token that does not hold the key of ``ca_cert`` as ``ca_ref``: a node on
    another token would issue nothing and answer every key use with "no such key".

    :raises Conflict: the key is missing, or another key has its id.
    """
    try:
        check_cert_matches(ca_cert, hsm.public_key(ca_ref))
    except (NotFound, HsmError, InvalidRequest):
        raise Conflict(
            f"the HSM token {hsm.token_label!r} does not hold the deployment's CA key "
            f"{ca_ref.key_id}"
        ) from None


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
