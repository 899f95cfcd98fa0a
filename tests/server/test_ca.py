# SPDX-License-Identifier: Apache-2.0
"""The CA and HSM-backed cryptography keys against a real SoftHSM2 token."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid

import pytest
from asn1crypto.core import UTF8String
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from server import ca
from server.errors import InvalidRequest
from server.hsm import Hsm, KeyAlg, KeyRef
from server.hsm.keys import (
    HsmEcPrivateKey,
    HsmEd25519PrivateKey,
    HsmRsaPrivateKey,
    private_key,
)

pytestmark = pytest.mark.hsm


BASE = "https://pki.example.test:8443"


def _label(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ca_pair(hsm: Hsm) -> tuple[KeyRef, x509.Certificate]:
    return ca.create_ca(hsm, "cardbridge test CA", label=_label("ca"))


@pytest.fixture(scope="module")
def user_keys(hsm: Hsm) -> dict[KeyAlg, KeyRef]:
    return {a: hsm.generate_key(a, _label(a.value))
            for a in (KeyAlg.P256, KeyAlg.RSA2048, KeyAlg.ED25519)}


def _subject(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def test_ca_certificate_is_self_signed_in_the_hsm(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate]
) -> None:
    ref, cert = ca_pair
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == hsm.public_key(ref)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"


@pytest.mark.parametrize(
    ("alg", "rsa_padding"),
    [
        (KeyAlg.P256, None),
        (KeyAlg.RSA2048, None),
        (KeyAlg.RSA2048, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)),
        (KeyAlg.ED25519, None),
    ],
)
def test_certificate_builder_signs_with_hsm_keys(
    hsm: Hsm, user_keys: dict[KeyAlg, KeyRef], alg: KeyAlg,
    rsa_padding: padding.PSS | None,
) -> None:
    key = private_key(hsm, user_keys[alg])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject("self"))
        .issuer_name(_subject("self"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    algorithm = None if alg is KeyAlg.ED25519 else hashes.SHA256()
    if rsa_padding is not None:
        cert = builder.sign(key, algorithm, rsa_padding=rsa_padding)
        assert cert.signature_algorithm_oid.dotted_string == "1.2.840.113549.1.1.10"
    else:
        cert = builder.sign(key, algorithm)
    cert.verify_directly_issued_by(cert)


def test_slot_certificates_carry_their_profiles_and_chain_to_the_ca(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate],
    user_keys: dict[KeyAlg, KeyRef],
) -> None:
    ca_ref, ca_cert = ca_pair
    pub = hsm.public_key(user_keys[KeyAlg.P256])
    certs = {
        slot: ca.issue_slot_cert(hsm, ca_ref, ca_cert, slot, pub, "alice",
                                 email="alice@example.org", upn="alice@corp.example",
                                 base_url=BASE)
        for slot in ca.SLOTS
    }
    for cert in certs.values():
        cert.verify_directly_issued_by(ca_cert)
        assert cert.public_key() == pub
        assert cert.subject.rfc4514_string() == "CN=alice"
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert _published_at(cert) == (f"{BASE}/crl", f"{BASE}/ca.crt")

    def ext(slot: str, cls: type[x509.ExtensionType]) -> x509.ExtensionType:
        return certs[slot].extensions.get_extension_for_class(cls).value

    assert list(ext("9a", x509.ExtendedKeyUsage)) == [  # type: ignore[call-overload]
        ExtendedKeyUsageOID.CLIENT_AUTH, ca.OID_SMARTCARD_LOGON]
    san = ext("9a", x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.org"]
    (upn,) = san.get_values_for_type(x509.OtherName)
    assert upn.type_id == ca.OID_UPN
    assert UTF8String.load(upn.value).native == "alice@corp.example"
    ku_9a = ext("9a", x509.KeyUsage)
    assert isinstance(ku_9a, x509.KeyUsage)
    assert ku_9a.digital_signature and not ku_9a.content_commitment

    ku_9c = ext("9c", x509.KeyUsage)
    assert isinstance(ku_9c, x509.KeyUsage)
    assert ku_9c.digital_signature and ku_9c.content_commitment
    assert list(ext("9c", x509.ExtendedKeyUsage)) == [  # type: ignore[call-overload]
        ExtendedKeyUsageOID.EMAIL_PROTECTION]

    ku_9d = ext("9d", x509.KeyUsage)
    assert isinstance(ku_9d, x509.KeyUsage)
    assert ku_9d.key_agreement and not ku_9d.key_encipherment and not ku_9d.digital_signature

    assert list(ext("9e", x509.ExtendedKeyUsage)) == [ca.OID_PIV_CARD_AUTH]  # type: ignore[call-overload]
    with pytest.raises(x509.ExtensionNotFound):
        certs["9e"].extensions.get_extension_for_class(x509.SubjectAlternativeName)

    # A real path validator accepts the 9A certificate for client authentication.
    verifier = PolicyBuilder().store(Store([ca_cert])).build_client_verifier()
    verified = verifier.verify(certs["9a"], [])
    assert verified.chain[-1] == ca_cert


def _published_at(cert: x509.Certificate) -> tuple[str, str]:
    """The CRL distribution point and the caIssuers URL a certificate names."""
    (point,) = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert point.full_name is not None
    (crl,) = point.full_name
    (issuers,) = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert issuers.access_method == AuthorityInformationAccessOID.CA_ISSUERS
    return crl.value, issuers.access_location.value


def test_tsa_certificate_is_for_time_stamping_only_and_never_outlives_the_ca(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate], user_keys: dict[KeyAlg, KeyRef]
) -> None:
    ca_ref, ca_cert = ca_pair
    pub = hsm.public_key(user_keys[KeyAlg.P256])
    cert = ca.issue_tsa_cert(hsm, ca_ref, ca_cert, pub, base_url=BASE)
    cert.verify_directly_issued_by(ca_cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not (ku.content_commitment or ku.key_cert_sign)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc  # capped at the CA's end
    assert _published_at(cert) == (f"{BASE}/crl", f"{BASE}/ca.crt")


def test_crl_lists_the_revoked_serials_and_is_signed_by_the_ca(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate]
) -> None:
    ca_ref, ca_cert = ca_pair
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    revoked = [(11, now - dt.timedelta(days=1)), (12, now)]
    crl = ca.build_crl(hsm, ca_ref, ca_cert, number=7, revoked=revoked, this_update=now,
                       next_update=now + dt.timedelta(days=7))  # fmt: skip
    assert crl.is_signature_valid(ca_cert.public_key())
    assert crl.issuer == ca_cert.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert [(r.serial_number, r.revocation_date_utc) for r in crl] == revoked
    assert crl.next_update_utc == now + dt.timedelta(days=7)


def test_rsa_key_management_cert_uses_key_encipherment(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate],
    user_keys: dict[KeyAlg, KeyRef],
) -> None:
    ca_ref, ca_cert = ca_pair
    pub = hsm.public_key(user_keys[KeyAlg.RSA2048])
    cert = ca.issue_slot_cert(hsm, ca_ref, ca_cert, "9D", pub, "bob", email="bob@example.org",
                              base_url=BASE)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_encipherment and not ku.key_agreement
    cert.verify_directly_issued_by(ca_cert)


def test_slot_cert_refuses_bad_slot_and_ed25519_key_management(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate],
    user_keys: dict[KeyAlg, KeyRef],
) -> None:
    ca_ref, ca_cert = ca_pair
    ed_pub = hsm.public_key(user_keys[KeyAlg.ED25519])
    with pytest.raises(InvalidRequest):
        ca.issue_slot_cert(hsm, ca_ref, ca_cert, "9d", ed_pub, "carol", base_url=BASE)
    with pytest.raises(InvalidRequest):
        ca.issue_slot_cert(hsm, ca_ref, ca_cert, "82", ed_pub, "carol", base_url=BASE)
    cert = ca.issue_slot_cert(hsm, ca_ref, ca_cert, "9c", ed_pub, "carol", base_url=BASE)
    cert.verify_directly_issued_by(ca_cert)


def test_tls_certificate_validates_as_a_server(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate]
) -> None:
    ca_ref, ca_cert = ca_pair
    cert, key_pem = ca.issue_tls_cert(hsm, ca_ref, ca_cert, ["localhost", "127.0.0.1"],
                                       base_url=BASE)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == cert.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    store = Store([ca_cert])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(store).build_server_verifier(name).verify(cert, [])
    with pytest.raises(InvalidRequest):
        ca.issue_tls_cert(hsm, ca_ref, ca_cert, [], base_url=BASE)


@pytest.mark.parametrize("alg", [KeyAlg.P256, KeyAlg.RSA2048, KeyAlg.ED25519])
def test_csr_signed_in_the_hsm_verifies(
    hsm: Hsm, user_keys: dict[KeyAlg, KeyRef], alg: KeyAlg
) -> None:
    csr = ca.build_csr(hsm, user_keys[alg], _subject("dave"))
    assert csr.is_signature_valid
    assert csr.public_key() == hsm.public_key(user_keys[alg])
    loaded = x509.load_pem_x509_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert loaded.subject == _subject("dave")


def test_cert_match_check_refuses_a_foreign_certificate(
    hsm: Hsm, ca_pair: tuple[KeyRef, x509.Certificate],
    user_keys: dict[KeyAlg, KeyRef],
) -> None:
    ca_ref, ca_cert = ca_pair
    pub = hsm.public_key(user_keys[KeyAlg.P256])
    cert = ca.issue_slot_cert(hsm, ca_ref, ca_cert, "9a", pub, "erin", base_url=BASE)
    ca.check_cert_matches(cert, pub)
    with pytest.raises(InvalidRequest, match="does not match"):
        ca.check_cert_matches(cert, hsm.public_key(user_keys[KeyAlg.RSA2048]))
    foreign = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidRequest):
        ca.check_cert_matches(cert, foreign)


def test_hsm_keys_decrypt_exchange_and_refuse_export(
    hsm: Hsm, user_keys: dict[KeyAlg, KeyRef]
) -> None:
    rsa_key = private_key(hsm, user_keys[KeyAlg.RSA2048])
    ec_key = private_key(hsm, user_keys[KeyAlg.P256])
    ed_key = private_key(hsm, user_keys[KeyAlg.ED25519])
    assert isinstance(rsa_key, HsmRsaPrivateKey) and isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ec_key, HsmEcPrivateKey) and isinstance(ed_key, HsmEd25519PrivateKey)
    assert rsa_key.key_size == 2048 and ec_key.key_size == 256
    ciphertext = rsa_key.public_key().encrypt(b"wrapped", padding.PKCS1v15())
    assert rsa_key.decrypt(ciphertext, padding.PKCS1v15()) == b"wrapped"
    with pytest.raises(UnsupportedAlgorithm):
        rsa_key.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                 hashes.SHA256(), None))
    peer = ec.generate_private_key(ec.SECP256R1())
    assert ec_key.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(
        ec.ECDH(), ec_key.public_key())
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    for key in (rsa_key, ec_key, ed_key):
        with pytest.raises(UnsupportedAlgorithm):
            key.private_bytes(pem, pkcs8, serialization.NoEncryption())
    with pytest.raises(UnsupportedAlgorithm):
        ec_key.private_numbers()
    with pytest.raises(UnsupportedAlgorithm):
        ed_key.private_bytes_raw()
