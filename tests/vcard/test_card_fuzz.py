"""Property tests: random and mutated APDUs always get a well-formed status word, the card
never fails internally (6F00), never exceeds Le, and still works afterwards."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from piv_host import PIN, PUK, Host, pad_pin

from vcard.apdu import CommandApdu
from vcard.card import VirtualCard
from vcard.constants import PinPolicy, Slot
from vcard.errors import WrongLength
from vcard.softkeys import SoftKeyBackend
from vcard.tlv import Tlv

pytestmark = pytest.mark.slow

SW1_VALID = {0x61, 0x63, 0x67, 0x68, 0x69, 0x6A, 0x6D, 0x6E, 0x90}
DIGEST = hashlib.sha256(b"still works").digest()
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
RSA_BODY = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, bytes(1) + b"\x01" + bytes(254)))

SEEDS = [
    bytes.fromhex("00a4040005a000000308"),
    bytes.fromhex("00a4040009a0000003080000100000"),
    bytes.fromhex("00cb3fff055c035fc10208"),
    bytes.fromhex("00cb3fff035c017e"),
    bytes.fromhex("00cb3fff0000055c035fc1020000"),
    bytes.fromhex("00c0000000"),
    bytes.fromhex("0020008008") + pad_pin(PIN),
    bytes.fromhex("00200080"),
    bytes.fromhex("0020ff80"),
    bytes([0x00, 0x87, 0x11, 0x9E, 36]) + Tlv(0x7C, Tlv(0x82) + Tlv(0x81, DIGEST)) + b"\x00",
    bytes([0x10, 0x87, 0x07, 0x9A, 0xFF]) + RSA_BODY[:255],
    bytes([0x00, 0x87, 0x07, 0x9A, len(RSA_BODY) - 255]) + RSA_BODY[255:] + b"\x00",
    bytes.fromhex("008703 9b047c028000".replace(" ", "")),
    bytes.fromhex("0087009b047c028100"),
    bytes.fromhex("0087039b0c7c0a82080102030405060708"),
    bytes.fromhex("0047009a05ac03800111"),
    bytes.fromhex("00db3fff085c035fc109530100"),
    bytes.fromhex("00f7009a00"),
    bytes.fromhex("00f7008000"),
    bytes.fromhex("00fd000000"),
    bytes.fromhex("00f8000000"),
    bytes.fromhex("00ffffff1b039b18") + bytes(24),
    bytes.fromhex("0024008010") + pad_pin(b"000000") + pad_pin(b"111111"),
    bytes.fromhex("002c008010") + pad_pin(b"99999999") + pad_pin(b"111111"),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    apdu = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(apdu) - 1)))
        if op == "flip" and apdu:
            apdu[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and apdu:
            apdu[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del apdu[pos:]
        elif op == "append":
            apdu += draw(st.binary(max_size=8))
        elif op == "insert":
            apdu[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and apdu:
            del apdu[pos]
    return bytes(apdu)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Well-framed APDUs with random header and body, short or extended."""
    cla = draw(st.sampled_from([0x00, 0x10, 0x00, 0x80, 0x0C, 0x01]))
    ins = draw(st.sampled_from([0x20, 0x24, 0x2C, 0x47, 0x87, 0xA4, 0xC0, 0xCB, 0xDB, 0xF7]))
    header = bytes([cla, ins, draw(st.integers(0, 255)), draw(st.integers(0, 255))])
    data = draw(st.binary(max_size=300))
    le = draw(st.none() | st.integers(0, 255))
    if len(data) > 255 or draw(st.booleans()):
        lc = len(data).to_bytes(2, "big") if data else b""
        body = b"\x00" + lc + data + (b"" if le is None else le.to_bytes(2, "big"))
        return header + body
    return (
        header + (bytes([len(data)]) + data if data else b"") + (b"" if le is None else bytes([le]))
    )


apdus = st.binary(max_size=300) | mutated() | structured()


@contextmanager
def fresh_card(template: Path) -> Iterator[VirtualCard]:
    root = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(template, root / "card")
        yield VirtualCard(SoftKeyBackend.open(root / "card"))
    finally:
        shutil.rmtree(root)


def check_response(apdu: bytes, response: bytes) -> None:
    assert len(response) >= 2
    sw = int.from_bytes(response[-2:], "big")
    assert response[-2] in SW1_VALID, f"{apdu.hex()} -> {sw:04X}"
    assert sw != 0x6F00
    if sw not in (0x9000,) and sw >> 8 != 0x61:
        assert len(response) == 2
    try:
        command = CommandApdu.parse(apdu)
    except WrongLength:
        assert sw == 0x6700
        return
    limit = command.ne or 256
    assert len(response) - 2 <= (limit if command.extended else min(limit, 256))


def sign_and_verify(host: Host, backend: SoftKeyBackend, slot: Slot) -> None:
    """Sign with whatever key the slot holds now (GENERATE may have replaced it)."""
    key_type = backend.key_type(slot)
    assert key_type is not None
    key = backend.public_key(slot)
    if isinstance(key, rsa.RSAPublicKey):
        t = SHA256_DIGEST_INFO + DIGEST
        block = b"\x00\x01" + b"\xff" * (key_type.size - len(t) - 3) + b"\x00" + t
        signature, sw = host.gen_auth(slot, key_type, 0x81, block)
        assert sw == 0x9000
        key.verify(signature, b"still works", padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePublicKey):
        signature, sw = host.gen_auth(slot, key_type, 0x81, DIGEST)
        assert sw == 0x9000
        key.verify(signature, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    else:
        signature, sw = host.gen_auth(slot, key_type, 0x81, DIGEST)
        assert sw == 0x9000
        key.verify(signature, DIGEST)


def check_still_works(card: VirtualCard) -> None:
    card.reset()
    host = Host(card)
    backend = card.applet.backend
    assert isinstance(backend, SoftKeyBackend)
    if backend.pin_policy(Slot.CARD_AUTH) is PinPolicy.NEVER:
        sign_and_verify(host, backend, Slot.CARD_AUTH)
    assert host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc102"))[:2] == b"\x53\x3b"
    alg, mgmt_key = backend.management_key()
    assert host.authenticate(mgmt_key, alg) == 0x9000
    if backend.pin_status().remaining == 0:
        if backend.puk_status().remaining == 0:
            assert host.verify() == 0x6983
            return
        assert host.send(0x2C, 0x00, 0x80, pad_pin(PUK) + pad_pin(PIN))[1] == 0x9000
    assert host.verify() == 0x9000
    sign_and_verify(host, backend, Slot.SIGNATURE)


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(apdu=apdus)
def test_single_apdu_gets_a_status_word(card_template: Path, apdu: bytes) -> None:
    with fresh_card(card_template) as card:
        check_response(apdu, card.transmit(apdu))
        check_still_works(card)


@FUZZ
@given(sequence=st.lists(apdus, min_size=1, max_size=12))
def test_apdu_sequences_leave_a_working_card(card_template: Path, sequence: list[bytes]) -> None:
    with fresh_card(card_template) as card:
        for apdu in sequence:
            check_response(apdu, card.transmit(apdu))
        check_still_works(card)


@FUZZ
@given(sequence=st.lists(mutated(), min_size=1, max_size=12))
def test_sequences_after_verify_and_mgmt_auth(card_template: Path, sequence: list[bytes]) -> None:
    """With the PIN verified and 9B authenticated, mutated commands reach deeper code."""
    with fresh_card(card_template) as card:
        host = Host(card)
        assert host.verify() == 0x9000 and host.authenticate() == 0x9000
        for apdu in sequence:
            check_response(apdu, card.transmit(apdu))
        check_still_works(card)
