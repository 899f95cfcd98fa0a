"""Provisioning a soft card: keys, certificate profiles, the CA, and `card init-soft`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from relay.card_cli import app
from vcard.constants import KeyType, Slot
from vcard.errors import NotACard
from vcard.provision import (
    CA_FILE,
    PIV_CARD_AUTH,
    SMARTCARD_LOGON,
    STANDARD_SLOTS,
    cert_object,
    init_soft,
)
from vcard.softkeys import SoftKeyBackend

PIN, PUK = b"123456", b"12345678"


def _ku(cert: x509.Certificate) -> x509.KeyUsage:
    return cert.extensions.get_extension_for_class(x509.KeyUsage).value


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _cert_from_object(value: bytes) -> x509.Certificate:
    """Parse the 53 content {70 L DER; 71 01 00; FE 00} by hand, independently of provision."""
    assert value[0] == 0x70, "the certificate must come first (ykpiv)"
    if value[1] == 0x82:
        length, start = int.from_bytes(value[2:4], "big"), 4
    elif value[1] == 0x81:
        length, start = value[2], 3
    else:
        length, start = value[1], 2
    der, rest = value[start : start + length], value[start + length :]
    assert rest == b"\x71\x01\x00\xfe\x00"
    return x509.load_der_x509_certificate(der)


@pytest.fixture(
    scope="module",
    params=["p256", "p384", "rsa2048", "ed25519", "rsa4096"],
)
def card(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prov") / request.param
    init_soft(path, KeyType.from_name(request.param), PIN, PUK)
    return path


def test_every_slot_has_a_key_and_its_certificate(card: Path) -> None:
    backend = SoftKeyBackend.open(card)
    for slot in STANDARD_SLOTS:
        value = backend.read_object(slot.object_id)
        assert value is not None, f"no certificate object for {slot}"
        cert = _cert_from_object(value)
        assert cert.public_key() == backend.public_key(slot)
        assert backend.key_type(slot) is KeyType.from_name(card.name)


def test_certificates_chain_to_the_written_ca(card: Path) -> None:
    ca = x509.load_pem_x509_certificate((card / CA_FILE).read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    backend = SoftKeyBackend.open(card)
    for slot in STANDARD_SLOTS:
        value = backend.read_object(slot.object_id)
        assert value is not None
        cert = _cert_from_object(value)
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_ca_private_key_is_not_kept(card: Path) -> None:
    for file in card.rglob("*"):
        if file.is_file() and file.parent.name != "keys":
            assert b"PRIVATE KEY" not in file.read_bytes(), f"{file} holds a private key"
    keys = sorted(p.name for p in (card / "keys").iterdir())
    assert keys == ["9a.pem", "9c.pem", "9d.pem", "9e.pem"]
    for key in (card / "keys").iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_slot_profiles(card: Path) -> None:
    key_type = KeyType.from_name(card.name)
    backend = SoftKeyBackend.open(card)
    certs = {}
    for slot in STANDARD_SLOTS:
        value = backend.read_object(slot.object_id)
        assert value is not None
        certs[slot] = _cert_from_object(value)

    auth = certs[Slot.AUTHENTICATION]
    assert _ku(auth).digital_signature and not _ku(auth).content_commitment
    assert _eku(auth) == [ExtendedKeyUsageOID.CLIENT_AUTH, SMARTCARD_LOGON]

    sign = certs[Slot.SIGNATURE]
    assert _ku(sign).digital_signature and _ku(sign).content_commitment
    assert _eku(sign) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]

    km = _ku(certs[Slot.KEY_MANAGEMENT])
    assert km.key_encipherment is key_type.is_rsa
    assert km.key_agreement is key_type.is_ec
    assert km.digital_signature is (key_type is KeyType.ED25519)

    card_auth = certs[Slot.CARD_AUTH]
    assert _ku(card_auth).digital_signature
    assert _eku(card_auth) == [PIV_CARD_AUTH]

    for cert in certs.values():
        assert _ku(cert).key_cert_sign is False
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def test_pin_and_puk_are_the_ones_given(tmp_path: Path) -> None:
    init_soft(tmp_path / "c", KeyType.ECCP256, b"24681357", b"87654321")
    backend = SoftKeyBackend.open(tmp_path / "c")
    backend.verify_pin(b"24681357")
    backend.unblock_pin(b"87654321", b"123456")
    backend.verify_pin(b"123456")


def test_refuses_a_directory_that_already_holds_a_card(tmp_path: Path) -> None:
    init_soft(tmp_path / "c", KeyType.ECCP256, PIN, PUK)
    before = (tmp_path / "c" / "keys" / "9a.pem").read_bytes()
    with pytest.raises(NotACard):
        init_soft(tmp_path / "c", KeyType.ECCP256, PIN, PUK)
    assert (tmp_path / "c" / "keys" / "9a.pem").read_bytes() == before


def test_refuses_a_non_empty_directory_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(NotACard, match="not an empty directory"):
        init_soft(tmp_path / "c", KeyType.ECCP256, PIN, PUK)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_an_empty_directory_becomes_the_card(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    card = init_soft(tmp_path / "c", KeyType.ECCP256, PIN, PUK)
    assert card.path == tmp_path / "c" and card.ca_path == tmp_path / "c" / CA_FILE
    assert SoftKeyBackend.open(tmp_path / "c").key_type(Slot.CARD_AUTH) is KeyType.ECCP256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700


def test_cert_object_lengths_round_trip(tmp_path: Path) -> None:
    card = init_soft(tmp_path / "c", KeyType.RSA2048, PIN, PUK)
    cert = card.slots[0].certificate
    obj = cert_object(cert)
    assert obj[:2] == b"\x70\x82"  # RSA-2048 certificates are longer than 255 bytes
    assert _cert_from_object(obj) == cert


runner = CliRunner()


def test_cli_init_soft_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["init-soft", str(tmp_path / "c"), "--alg", "p384", "--json"])
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    assert made["alg"] == "p384"
    assert [s["slot"] for s in made["slots"]] == ["9A", "9C", "9D", "9E"]
    assert Path(made["ca"]).is_file()
    ca = x509.load_pem_x509_certificate(Path(made["ca"]).read_bytes())
    backend = SoftKeyBackend.open(tmp_path / "c")
    value = backend.read_object(Slot.SIGNATURE.object_id)
    assert value is not None
    fingerprint = _cert_from_object(value).fingerprint(hashes.SHA256()).hex()
    assert made["slots"][1]["sha256"] == fingerprint
    assert ca.public_bytes(serialization.Encoding.PEM) == Path(made["ca"]).read_bytes()
    assert "123456" not in result.output  # no secrets in the report


def test_cli_init_soft_human_output_and_pins(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["init-soft", str(tmp_path / "c"), "--alg", "ed25519", "--pin", "13572468"]
    )
    assert result.exit_code == 0, result.output
    assert "ed25519 card" in result.output and "ca.pem" in result.output
    SoftKeyBackend.open(tmp_path / "c").verify_pin(b"13572468")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alg", "dsa1024"], "unknown key type"),
        (["--pin", "12"], "cannot create a card"),
    ],
)
def test_cli_init_soft_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["init-soft", str(tmp_path / "c"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing half-made, no staging directory left


def test_cli_init_soft_refuses_existing_card(tmp_path: Path) -> None:
    assert runner.invoke(app, ["init-soft", str(tmp_path / "c")]).exit_code == 0
    result = runner.invoke(app, ["init-soft", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "already holds a card" in result.output
