"""OpenSC's PKCS#11 module on the real reader: objects, signatures, ECDH, RSA decryption.

Every signature is checked by `openssl` against the slot's certificate, never by the card.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pcsc_stack import PIN, PKCS11_ID, SoftCard, pkcs11, pkcs11_sign, run

from vcard.constants import Slot

pytestmark = pytest.mark.pcsc

SLOTS = [Slot.AUTHENTICATION, Slot.SIGNATURE, Slot.KEY_MANAGEMENT, Slot.CARD_AUTH]
SIGNING_SLOTS = [Slot.AUTHENTICATION, Slot.SIGNATURE, Slot.CARD_AUTH]


def test_list_objects_shows_four_certificates_and_private_keys(soft_card: SoftCard) -> None:
    out = pkcs11("--login", "--pin", PIN, "--list-objects")
    certs = re.findall(r"^Certificate Object; type = X\.509 cert", out, re.M)
    keys = re.findall(r"^Private Key Object; (RSA|EC)", out, re.M)
    assert len(certs) == 4, out
    assert len(keys) == 4, out
    for slot, ident in PKCS11_ID.items():
        assert f"ID:         {ident}" in out, f"no object with id {ident} for {slot}"
    expected = "RSA" if soft_card.key_type.is_rsa else "EC"
    assert set(keys) == {expected}
    if soft_card.key_type.is_rsa:
        assert f"RSA {soft_card.key_type.bit_len} bits" in out


def _sign(card: SoftCard, slot: Slot, mechanism: str, tmp_path: Path) -> bool:
    data = tmp_path / "data.bin"
    data.write_bytes(b"cardbridge signs this " + bytes(range(64)))
    sig = tmp_path / f"sig-{slot.value:02x}-{mechanism}.bin"
    pkcs11_sign(PKCS11_ID[slot], mechanism, data, sig)
    pub = card.pubkey_pem(slot, tmp_path)
    sigopts: list[str] = []
    if "PSS" in mechanism:
        sigopts = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:auto"]
    out = run("openssl", "dgst", "-sha256", "-verify", pub, *sigopts, "-signature", sig, data)
    return "Verified OK" in out


@pytest.mark.parametrize("slot", SIGNING_SLOTS, ids=lambda s: f"{s.value:02X}")
def test_signatures_verify_with_openssl(soft_card: SoftCard, slot: Slot, tmp_path: Path) -> None:
    if soft_card.key_type.is_rsa:
        assert _sign(soft_card, slot, "SHA256-RSA-PKCS", tmp_path)
        assert _sign(soft_card, slot, "SHA256-RSA-PKCS-PSS", tmp_path)
    else:
        assert _sign(soft_card, slot, "ECDSA-SHA256", tmp_path)


def test_wrong_signature_is_rejected_by_openssl(soft_card: SoftCard, tmp_path: Path) -> None:
    """The verification above could fail: a signature from another slot does not verify."""
    data = tmp_path / "data.bin"
    data.write_bytes(b"payload")
    sig = tmp_path / "sig.bin"
    mechanism = "SHA256-RSA-PKCS" if soft_card.key_type.is_rsa else "ECDSA-SHA256"
    pkcs11_sign("01", mechanism, data, sig)
    other = soft_card.pubkey_pem(Slot.CARD_AUTH, tmp_path)
    out = run("openssl", "dgst", "-sha256", "-verify", other, "-signature", sig, data, ok=False)
    assert "Verification failure" in out


def test_key_management_slot(soft_card: SoftCard, tmp_path: Path) -> None:
    """9D: ECDH derive matches the peer's own computation, or RSA decrypt round-trips."""
    if soft_card.key_type.is_rsa:
        message = b"a 32-byte content-encryption key"
        plain, cipher, out = tmp_path / "m", tmp_path / "c", tmp_path / "p"
        plain.write_bytes(message)
        pub = soft_card.pubkey_pem(Slot.KEY_MANAGEMENT, tmp_path)
        run("openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", plain, "-out", cipher)
        pkcs11(
            "--login",
            "--pin",
            PIN,
            "--decrypt",
            "--id",
            "03",
            "-m",
            "RSA-PKCS",
            "-i",
            cipher,
            "-o",
            out,
        )
        assert out.read_bytes() == message
        return
    card_pub = soft_card.certs[Slot.KEY_MANAGEMENT].public_key()
    assert isinstance(card_pub, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(card_pub.curve)
    peer_der = tmp_path / "peer.der"
    peer_der.write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    secret = tmp_path / "secret.bin"
    pkcs11(
        "--login",
        "--pin",
        PIN,
        "--derive",
        "-m",
        "ECDH1-DERIVE",
        "--id",
        "03",
        "-i",
        peer_der,
        "-o",
        secret,
    )
    expected = peer.exchange(ec.ECDH(), card_pub)
    assert secret.read_bytes() == expected
