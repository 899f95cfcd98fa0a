"""Crypto round trips through the card with SoftKeyBackend, checked by cryptography."""

from __future__ import annotations

import datetime
import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import NameOID
from piv_host import KEYS, Host, ecb

from vcard.constants import DEFAULT_MANAGEMENT_KEY, KeyType, MgmtAlg, Slot
from vcard.softkeys import SoftKeyBackend
from vcard.tlv import Tlv

MESSAGE = b"cardbridge signs this"
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def pkcs1v15_block(message: bytes, size: int) -> bytes:
    """EMSA-PKCS1-v1_5 with SHA-256 (RFC 8017 §9.2), as the host pads it."""
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def mgf1(seed: bytes, length: int) -> bytes:
    out = b""
    for counter in range((length + 31) // 32):
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
    return out[:length]


def pss_block(message: bytes, mod_bits: int, salt: bytes) -> bytes:
    """EMSA-PSS-ENCODE with SHA-256 and MGF1-SHA-256 (RFC 8017 §9.1.1)."""
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    m_hash = hashlib.sha256(message).digest()
    h = hashlib.sha256(bytes(8) + m_hash + salt).digest()
    db = bytes(em_len - len(salt) - 32 - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, mgf1(h, em_len - 33), strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    return em.rjust(mod_bits // 8, b"\x00")


RSA_SLOTS = [s for s, t in KEYS.items() if t.is_rsa]
EC_SLOTS = [s for s, t in KEYS.items() if t.is_ec]


@pytest.mark.parametrize("slot", RSA_SLOTS, ids=str)
def test_rsa_pkcs1v15_and_pss_sign(host: Host, backend: SoftKeyBackend, slot: Slot) -> None:
    key_type = KEYS[slot]
    key = backend.public_key(slot)
    assert isinstance(key, rsa.RSAPublicKey)
    host.verify()
    signature, sw = host.gen_auth(slot, key_type, 0x81, pkcs1v15_block(MESSAGE, key_type.size))
    assert sw == 0x9000 and len(signature) == key_type.size
    key.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())

    block = pss_block(MESSAGE, key.key_size, os.urandom(32))
    signature, sw = host.gen_auth(slot, key_type, 0x81, block)
    assert sw == 0x9000 and len(signature) == key_type.size
    key.verify(signature, MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


@pytest.mark.parametrize("slot", RSA_SLOTS, ids=str)
def test_rsa_decrypt_round_trips(host: Host, backend: SoftKeyBackend, slot: Slot) -> None:
    key = backend.public_key(slot)
    assert isinstance(key, rsa.RSAPublicKey)
    secret = os.urandom(32)
    ciphertext = key.encrypt(secret, padding.PKCS1v15())
    host.verify()
    block, sw = host.gen_auth(slot, KEYS[slot], 0x81, ciphertext)
    assert sw == 0x9000 and len(block) == KEYS[slot].size
    assert block[:2] == b"\x00\x02" and block.endswith(b"\x00" + secret)
    assert b"\x00" not in block[2 : -len(secret) - 1]


def test_rsa_output_is_left_padded(backend: SoftKeyBackend) -> None:
    """x^d mod n for a tiny x can be short; the card always returns the modulus length."""
    slot = Slot.RETIRED4
    key = backend.public_key(slot)
    assert isinstance(key, rsa.RSAPublicKey)
    n = key.public_numbers().n
    # Find an input whose result has a leading zero byte by trying x = y^e for small y.
    y = 2
    block = pow(y, key.public_numbers().e, n).to_bytes(256, "big")
    result = backend.rsa_raw(slot, block)
    assert len(result) == 256 and int.from_bytes(result, "big") == y


@pytest.mark.parametrize("slot", EC_SLOTS, ids=str)
@pytest.mark.parametrize(
    "hash_alg",
    [hashes.SHA1(), hashes.SHA256(), hashes.SHA384()],  # noqa: S303
    ids=lambda h: h.name,
)
def test_ecdsa_der_verifies(
    host: Host, backend: SoftKeyBackend, slot: Slot, hash_alg: hashes.HashAlgorithm
) -> None:
    key_type = KEYS[slot]
    key = backend.public_key(slot)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    digester = hashes.Hash(hash_alg)
    digester.update(MESSAGE)
    digest = digester.finalize()
    host.verify()
    signature, sw = host.gen_auth(slot, key_type, 0x81, digest)
    if len(digest) > key_type.size:
        assert sw == 0x6A80, "hosts truncate digests to the field size"
        return
    assert sw == 0x9000
    assert signature[0] == 0x30, "DER SEQUENCE, not raw r||s"
    utils.decode_dss_signature(signature)
    key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hash_alg)))


@pytest.mark.parametrize("slot", EC_SLOTS, ids=str)
def test_ecdh_matches_the_peer(host: Host, backend: SoftKeyBackend, slot: Slot) -> None:
    key = backend.public_key(slot)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(key.curve)
    point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    host.verify()
    shared, sw = host.gen_auth(slot, KEYS[slot], 0x85, point)
    assert sw == 0x9000
    assert shared == peer.exchange(ec.ECDH(), key)


def test_ecdh_apple_form(host: Host, backend: SoftKeyBackend) -> None:
    """Apple's PIVToken sample asks {85 00; 81 point}."""
    key = backend.public_key(Slot.KEY_MANAGEMENT)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(key.curve)
    point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    host.verify()
    out = host.ok(
        0x87, KeyType.ECCP384, Slot.KEY_MANAGEMENT, Tlv(0x7C, Tlv(0x85) + Tlv(0x81, point))
    )
    assert Tlv.unpack(0x82, Tlv.unpack(0x7C, out)) == peer.exchange(ec.ECDH(), key)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 2000])
def test_ed25519_signs_the_whole_message(host: Host, backend: SoftKeyBackend, size: int) -> None:
    message = os.urandom(size) if size else b""
    key = backend.public_key(Slot.RETIRED3)
    assert isinstance(key, ed25519.Ed25519PublicKey)
    host.verify()
    signature, sw = host.gen_auth(Slot.RETIRED3, KeyType.ED25519, 0x81, message)
    if size == 0:
        assert sw == 0x6A80, "an empty 81 leaves no input"
        return
    assert sw == 0x9000 and len(signature) == 64
    key.verify(signature, message)


def _certificate(public_key: object, cn: str) -> x509.Certificate:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )


def _public_from_generate(reply: bytes, key_type: KeyType) -> object:
    items = Tlv.parse_dict(Tlv.unpack(0x7F49, reply))
    if key_type.is_rsa:
        assert set(items) == {0x81, 0x82}
        n, e = (int.from_bytes(items[t], "big") for t in (0x81, 0x82))
        return rsa.RSAPublicNumbers(e, n).public_key()
    assert set(items) == {0x86}
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(items[0x86])
    curve = ec.SECP256R1() if key_type is KeyType.ECCP256 else ec.SECP384R1()
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, items[0x86])


@pytest.mark.parametrize(
    "key_type", [KeyType.ECCP256, KeyType.RSA2048, KeyType.ED25519, KeyType.ECCP384]
)
def test_generate_then_put_certificate_then_sign(host: Host, key_type: KeyType) -> None:
    assert host.authenticate() == 0x9000
    reply = host.ok(0x47, 0x00, Slot.AUTHENTICATION, Tlv(0xAC, Tlv(0x80, bytes([key_type]))))
    key = _public_from_generate(reply, key_type)
    der = _certificate(key, "generated").public_bytes(serialization.Encoding.DER)
    value = Tlv(0x70, der) + Tlv(0x71, b"\x00") + Tlv(0xFE)
    host.ok(0xDB, 0x3F, 0xFF, Tlv(0x5C, bytes.fromhex("5fc105")) + Tlv(0x53, value))
    assert host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc105")) == Tlv(0x53, value)

    # Metadata reports the same key.
    metadata = Tlv.parse_dict(host.ok(0xF7, 0x00, Slot.AUTHENTICATION))
    assert metadata[0x01] == bytes([key_type])
    assert metadata[0x04] == Tlv.unpack(0x7F49, reply)

    assert host.verify() == 0x9000
    if key_type.is_rsa:
        signature, sw = host.gen_auth(
            Slot.AUTHENTICATION, key_type, 0x81, pkcs1v15_block(MESSAGE, 256)
        )
        assert sw == 0x9000
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    elif key_type is KeyType.ED25519:
        signature, sw = host.gen_auth(Slot.AUTHENTICATION, key_type, 0x81, MESSAGE)
        assert sw == 0x9000
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(signature, MESSAGE)
    else:
        digest = hashlib.sha256(MESSAGE).digest()
        signature, sw = host.gen_auth(Slot.AUTHENTICATION, key_type, 0x81, digest)
        assert sw == 0x9000
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_generate_with_pin_policy_never(host: Host) -> None:
    assert host.authenticate() == 0x9000
    reply = host.ok(
        0x47,
        0x00,
        Slot.RETIRED5,
        Tlv(0xAC, Tlv(0x80, b"\x11") + Tlv(0xAA, b"\x01") + Tlv(0xAB, b"\x01")),
    )
    key = _public_from_generate(reply, KeyType.ECCP256)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    host.card.reset()
    digest = hashlib.sha256(MESSAGE).digest()
    signature, sw = host.gen_auth(Slot.RETIRED5, KeyType.ECCP256, 0x81, digest)
    assert sw == 0x9000
    key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_put_data_empty_value_deletes(host: Host) -> None:
    assert host.authenticate() == 0x9000
    tag = Tlv(0x5C, bytes.fromhex("5fc109"))
    host.ok(0xDB, 0x3F, 0xFF, tag + Tlv(0x53, b"\x01\x02"))
    host.verify()
    assert host.ok(0xCB, 0x3F, 0xFF, tag) == bytes.fromhex("53020102")
    host.ok(0xDB, 0x3F, 0xFF, tag + Tlv(0x53))
    assert host.send(0xCB, 0x3F, 0xFF, tag)[1] == 0x6A82


def test_key_history_counts_contiguous_retired_certs(host: Host) -> None:
    assert host.authenticate() == 0x9000
    for tag in ("5fc10d", "5fc10e", "5fc110"):  # 82, 83, and 85 (a gap at 84)
        host.ok(0xDB, 0x3F, 0xFF, Tlv(0x5C, bytes.fromhex(tag)) + Tlv(0x53, b"\x70\x00"))
    history = Tlv.parse_dict(
        Tlv.unpack(0x53, host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc10c")))
    )
    assert history[0xC1] == b"\x02" and history[0xC2] == b"\x00"


@pytest.mark.parametrize(
    ("alg", "key"),
    [
        (MgmtAlg.AES128, bytes(range(16))),
        (MgmtAlg.AES192, bytes(range(24))),
        (MgmtAlg.AES256, bytes(range(32))),
        (MgmtAlg.TDES, bytes(range(24))),
    ],
    ids=lambda v: v.name if isinstance(v, MgmtAlg) else "",
)
def test_set_management_key_and_authenticate(host: Host, alg: MgmtAlg, key: bytes) -> None:
    assert host.authenticate() == 0x9000
    host.ok(0xFF, 0xFF, 0xFF, bytes([alg]) + Tlv(0x9B, key))
    host.card.reset()
    if alg is MgmtAlg.TDES:
        assert host.authenticate() == 0x6982, "the old key no longer works"
    else:
        assert host.send(0x87, MgmtAlg.TDES, 0x9B, bytes.fromhex("7c028000"))[1] == 0x6A86
    host.card.reset()
    assert host.authenticate(key, alg) == 0x9000
    # OpenSC's external authentication: 81 00 -> challenge; 82 E(challenge).
    host.card.reset()
    out = host.ok(0x87, alg, 0x9B, bytes.fromhex("7c028100"))
    challenge = Tlv.unpack(0x81, Tlv.unpack(0x7C, out))
    assert len(challenge) == alg.block_size
    response = Tlv(0x7C, Tlv(0x82, ecb(alg, key, challenge)))
    assert host.send(0x87, alg, 0x9B, response)[1] == 0x9000
    assert host.send(0xDB, 0x3F, 0xFF, bytes.fromhex("5c035fc109530100"))[1] == 0x9000
    metadata = Tlv.parse_dict(host.ok(0xF7, 0x00, 0x9B))
    assert metadata[0x01] == bytes([alg]) and metadata[0x05] == b"\x00"


def test_external_auth_wrong_response_and_voided_challenge(host: Host) -> None:
    out = host.ok(0x87, 0x03, 0x9B, bytes.fromhex("7c028100"))
    challenge = Tlv.unpack(0x81, Tlv.unpack(0x7C, out))
    response = Tlv(0x7C, Tlv(0x82, bytes(8)))
    assert host.send(0x87, 0x03, 0x9B, response)[1] == 0x6982
    # Any other command voids the pending challenge.
    out = host.ok(0x87, 0x03, 0x9B, bytes.fromhex("7c028100"))
    challenge = Tlv.unpack(0x81, Tlv.unpack(0x7C, out))
    host.ok(0xFD, 0x00, 0x00)
    response = Tlv(0x7C, Tlv(0x82, ecb(MgmtAlg.TDES, DEFAULT_MANAGEMENT_KEY, challenge)))
    assert host.send(0x87, 0x03, 0x9B, response)[1] == 0x6982


def test_select_reply(host: Host) -> None:
    out = host.ok(0xA4, 0x04, 0x00, bytes.fromhex("a000000308"))
    assert len(out) < 128
    apt = Tlv.parse_list(Tlv.unpack(0x61, out))
    assert apt[0] == Tlv(0x4F, bytes.fromhex("a000000308000010000100"))
    assert apt[1] == Tlv(0x79, bytes.fromhex("4f05a000000308"))
    algorithms = {Tlv.unpack(0x80, Tlv.parse_list(t.value)[0]) for t in apt if t.tag == 0xAC}
    assert {bytes([k]) for k in (0x07, 0x05, 0x11, 0x14, 0x03)} <= algorithms


def test_chuid_ccc_discovery(host: Host, backend: SoftKeyBackend) -> None:
    chuid = Tlv.parse_dict(Tlv.unpack(0x53, host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc102"))))
    guid = backend.card_guid()
    assert chuid[0x34] == guid and any(guid) and len(guid) == 16
    assert chuid[0x30].hex() == "d4e739da739ced39ce739d836858210842108421c84210c3eb"
    assert chuid[0x35] == b"20300101"
    # Stable across reopen and across cards made from the same directory.
    assert SoftKeyBackend.open(backend.path).card_guid() == guid
    ccc = Tlv.parse_dict(Tlv.unpack(0x53, host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc107"))))
    assert ccc[0xF0][:5] == bytes.fromhex("a000000116") and len(ccc[0xF0]) == 21
    assert host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c017e")).hex() == (
        "7e124f0ba0000003080000100001005f2f024000"
    )
    assert host.ok(0xFD, 0, 0) == bytes([5, 7, 0])
    serial = host.ok(0xF8, 0, 0)
    assert len(serial) == 4 and serial == host.ok(0xF8, 0, 0) and any(serial)
