"""Per instruction: bad input or state -> the status word of the edge reference's table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from piv_host import PIN, Host, ecb, pad_pin

from vcard.card import VirtualCard
from vcard.constants import DEFAULT_MANAGEMENT_KEY, MgmtAlg, Slot
from vcard.piv import MAX_OBJECT_SIZE
from vcard.tlv import Tlv


def apdu(header: str, data: bytes | str = b"", le: int | None = None) -> bytes:
    body = bytes.fromhex(data) if isinstance(data, str) else data
    out = bytes.fromhex(header)
    if body:
        out += bytes([len(body)]) + body
    if le is not None:
        out += bytes([le])
    return out


def none(host: Host) -> None:
    pass


def pin(host: Host) -> None:
    assert host.verify() == 0x9000


def mgmt(host: Host) -> None:
    assert host.authenticate() == 0x9000


Setup = Callable[[Host], None]
P256_POINT_OFF_CURVE = "04" + "00" * 63 + "01"

CASES: list[tuple[str, Setup, bytes, int]] = [
    # SELECT (§3.1)
    ("select GIDS", none, apdu("00a40400", "a00000039742544659"), 0x6A82),
    ("select PnP", none, apdu("00a40400", "a0000003974349445f0100"), 0x6A82),
    ("select Yubico mgmt", none, apdu("00a40400", "a000000527471117"), 0x6A82),
    ("select OTP", none, apdu("00a40400", "a0000005272001 01".replace(" ", "")), 0x6A82),
    ("select MuscleCard", none, apdu("00a40400", "a00000000101"), 0x6A82),
    ("select 4-byte prefix", none, apdu("00a40400", "a0000003"), 0x6A82),
    ("select AID + 1 byte", none, apdu("00a40400", "a00000030800001000010000"), 0x6A82),
    ("select MF by FID", none, apdu("00a40000", "3f00"), 0x6A82),
    ("select no AID", none, apdu("00a40400"), 0x6A82),
    ("select P1 05", none, apdu("00a40500", "a000000308"), 0x6A86),
    ("select P2 04", none, apdu("00a40404", "a000000308"), 0x6A86),
    ("select 5 bytes", none, apdu("00a40400", "a000000308"), 0x9000),
    ("select 11 bytes P2=0C", none, apdu("00a4040c", "a000000308000010000100"), 0x9000),
    # GET DATA (§3.2)
    ("get data P1P2", none, apdu("00cb3ffe", "5c017e", 0), 0x6A86),
    ("get data not 5C", none, apdu("00cb3fff", "5d017e", 0), 0x6A80),
    ("get data 4-byte tag", none, apdu("00cb3fff", "5c045fc10200", 0), 0x6A80),
    ("get data empty tag", none, apdu("00cb3fff", "5c00", 0), 0x6A80),
    ("get data trailing", none, apdu("00cb3fff", "5c017e00", 0), 0x6A80),
    ("get data unknown tag", none, apdu("00cb3fff", "5c035fc1ff", 0), 0x6A82),
    ("get data absent cert", none, apdu("00cb3fff", "5c035fc105", 0), 0x6A82),
    ("get data absent retired", none, apdu("00cb3fff", "5c035fc10d", 0), 0x6A82),
    ("get data security obj", none, apdu("00cb3fff", "5c035fc106", 0), 0x6A82),
    ("fingerprints no PIN", none, apdu("00cb3fff", "5c035fc103", 0), 0x6982),
    ("printed no PIN", none, apdu("00cb3fff", "5c035fc109", 0), 0x6982),
    ("facial no PIN", none, apdu("00cb3fff", "5c035fc108", 0), 0x6982),
    ("iris no PIN", none, apdu("00cb3fff", "5c035fc121", 0), 0x6982),
    ("printed with PIN", pin, apdu("00cb3fff", "5c035fc109", 0), 0x6A82),
    ("setcos probe", none, bytes.fromhex("00cadf3005"), 0x6D00),
    ("CHUID", none, apdu("00cb3fff", "5c035fc102", 0), 0x9000),
    ("CCC", none, apdu("00cb3fff", "5c035fc107", 0), 0x9000),
    ("key history", none, apdu("00cb3fff", "5c035fc10c", 0), 0x9000),
    ("discovery", none, apdu("00cb3fff", "5c017e", 0), 0x9000),
    # VERIFY (§3.3)
    *[
        (f"verify P2 {p2:02X}", none, apdu(f"002000{p2:02x}", pad_pin(PIN)), 0x6A88)
        for p2 in (0x00, 0x81, 0x96, 0x97, 0x98)
    ],
    ("verify P1 01", none, apdu("00200180", pad_pin(PIN)), 0x6A86),
    ("verify Lc 7", none, apdu("00200080", PIN + b"\xff"), 0x6A80),
    ("verify Lc 9", none, apdu("00200080", pad_pin(PIN) + b"\xff"), 0x6A80),
    ("verify all FF", none, apdu("00200080", b"\xff" * 8), 0x6A80),
    ("verify FF inside", none, apdu("00200080", b"12\xff3456\xff"), 0x6A80),
    ("verify P1=FF with data", none, apdu("0020ff80", pad_pin(PIN)), 0x6A80),
    ("verify status", none, bytes.fromhex("00200080"), 0x63C3),
    ("verify status ykpiv", none, bytes.fromhex("0020008000"), 0x63C3),
    ("verify status verified", pin, bytes.fromhex("00200080"), 0x9000),
    ("verify reset", pin, bytes.fromhex("0020ff80"), 0x9000),
    ("verify wrong", none, apdu("00200080", pad_pin(b"654321")), 0x63C2),
    # CHANGE REFERENCE DATA, RESET RETRY COUNTER (§3.4)
    ("change P2 82", none, apdu("00240082", pad_pin(PIN) * 2), 0x6A88),
    ("change P2 9B", none, apdu("0024009b", pad_pin(PIN) * 2), 0x6A88),
    ("change P1 01", none, apdu("00240180", pad_pin(PIN) * 2), 0x6A86),
    ("change Lc 8", none, apdu("00240080", pad_pin(PIN)), 0x6A80),
    ("change new too short", none, apdu("00240080", pad_pin(PIN) + pad_pin(b"12345")), 0x6A80),
    ("change wrong old", none, apdu("00240080", pad_pin(b"000000") + pad_pin(b"111111")), 0x63C2),
    ("change wrong PUK", none, apdu("00240081", pad_pin(b"000000") + pad_pin(b"111111")), 0x63C2),
    ("reset P2 81", none, apdu("002c0081", pad_pin(b"12345678") + pad_pin(PIN)), 0x6A88),
    ("reset P1 01", none, apdu("002c0180", pad_pin(b"12345678") + pad_pin(PIN)), 0x6A86),
    ("reset Lc 15", none, apdu("002c0080", pad_pin(b"12345678") + PIN), 0x6A80),
    ("reset wrong PUK", none, apdu("002c0080", pad_pin(b"87654321") + pad_pin(PIN)), 0x63C2),
    ("reset new PIN bad", none, apdu("002c0080", pad_pin(b"12345678") + pad_pin(b"1")), 0x6A80),
    # GENERAL AUTHENTICATE (§3.5)
    ("sign 9A no PIN", none, apdu("0087079a", "7c0682008102aabb"), 0x6982),
    ("sign 9C no PIN", none, apdu("0087119c", "7c0682008102aabb"), 0x6982),
    ("sign 9D no PIN", none, apdu("0087149d", "7c0682008102aabb"), 0x6982),
    ("alg mismatch", pin, apdu("0087079c", "7c0682008102aabb"), 0x6A80),
    ("empty slot", pin, apdu("00871186", "7c0682008102aabb"), 0x6A80),
    ("bad keyref F9", pin, apdu("008711f9", "7c0682008102aabb"), 0x6A86),
    ("bad keyref 80", pin, apdu("00871180", "7c0682008102aabb"), 0x6A86),
    ("bad alg 06", pin, apdu("0087069a", "7c0682008102aabb"), 0x6A86),
    ("bad alg E1", pin, apdu("0087e19d", "7c0682008102aabb"), 0x6A86),
    ("not 7C", pin, apdu("0087119e", "7d0682008102aabb"), 0x6A80),
    ("no output tag", pin, apdu("0087119e", "7c048102aabb"), 0x6A80),
    ("no input", pin, apdu("0087119e", "7c028200"), 0x6A80),
    ("both empty", pin, apdu("0087119e", "7c0482008100"), 0x6A80),
    ("extra tag", pin, apdu("0087119e", "7c0882008102aabb8000"), 0x6A80),
    ("duplicate tag", pin, apdu("0087119e", "7c088200820081020102"), 0x6A80),
    ("truncated template", pin, apdu("0087119e", "7c0682008104aabb"), 0x6A80),
    ("RSA short block", pin, apdu("0087079a", "7c0682008102aabb"), 0x6A80),
    (
        "ECDSA digest too long",
        none,
        apdu("0087119e", Tlv(0x7C, Tlv(0x82) + Tlv(0x81, bytes(33)))),
        0x6A80,
    ),
    (
        "ECDH point wrong size",
        pin,
        apdu("0087149d", Tlv(0x7C, Tlv(0x82) + Tlv(0x85, b"\x04" + bytes(64)))),
        0x6A80,
    ),
    (
        "ECDH off curve",
        none,
        apdu("0087119e", Tlv(0x7C, Tlv(0x82) + Tlv(0x85, bytes.fromhex(P256_POINT_OFF_CURVE)))),
        0x6A80,
    ),
    (
        "ECDH on RSA",
        pin,
        apdu("0087079a", Tlv(0x7C, Tlv(0x82) + Tlv(0x85, b"\x04" + bytes(64)))),
        0x6A80,
    ),
    ("9B wrong alg", none, apdu("0087089b", "7c028000"), 0x6A86),
    ("9B response, nothing pending", none, apdu("0087039b", "7c0a82080102030405060708"), 0x6982),
    (
        "9B mutual, nothing pending",
        none,
        apdu("0087039b", "7c148008010203040506070881080102030405060708"),
        0x6982,
    ),
    ("9B malformed", none, apdu("0087039b", "7c028300"), 0x6A80),
    ("9B OpenSC RNG", none, bytes.fromhex("008700 9b047c028100".replace(" ", "")), 0x9000),
    # GENERATE and PUT DATA (§3.6)
    ("generate no mgmt", none, apdu("0047009a", "ac03800111"), 0x6982),
    ("generate P1 01", mgmt, apdu("0047019a", "ac03800111"), 0x6A86),
    ("generate slot 9B", mgmt, apdu("0047009b", "ac03800111"), 0x6A86),
    ("generate slot 80", mgmt, apdu("00470080", "ac03800111"), 0x6A86),
    ("generate no AC", mgmt, apdu("0047009a", "800111"), 0x6A80),
    ("generate alg 06", mgmt, apdu("0047009a", "ac03800106"), 0x6A80),
    ("generate no alg", mgmt, apdu("0047009a", "ac00"), 0x6A80),
    ("generate pin policy 09", mgmt, apdu("0047009a", "ac06800111aa0109"), 0x6A80),
    ("generate touch always", mgmt, apdu("0047009a", "ac06800111ab0102"), 0x6A80),
    ("generate unknown tag", mgmt, apdu("0047009a", "ac06800111ac0100"), 0x6A80),
    ("put data no mgmt", none, apdu("00db3fff", "5c035fc1055300"), 0x6982),
    ("put data P1P2", mgmt, apdu("00db3ffe", "5c035fc1055300"), 0x6A86),
    ("put data discovery", mgmt, apdu("00db3fff", "5c017e7e00"), 0x6A80),
    ("put data unknown tag", mgmt, apdu("00db3fff", "5c035fc1ff530100"), 0x6A80),
    ("put data no 53", mgmt, apdu("00db3fff", "5c035fc105540100"), 0x6A80),
    ("put data one TLV", mgmt, apdu("00db3fff", "5c035fc105"), 0x6A80),
    ("put data ok", mgmt, apdu("00db3fff", "5c035fc109530100"), 0x9000),
    # Yubico extensions (§3.7)
    ("version", none, bytes.fromhex("00fd000000"), 0x9000),
    ("serial", none, bytes.fromhex("00f8000000"), 0x9000),
    ("metadata P1 01", none, bytes.fromhex("00f7019a00"), 0x6A86),
    ("metadata empty slot", none, bytes.fromhex("00f7008600"), 0x6A88),
    ("metadata unknown ref", none, bytes.fromhex("00f7004200"), 0x6A88),
    ("metadata PIN", none, bytes.fromhex("00f7008000"), 0x9000),
    ("metadata 9B", none, bytes.fromhex("00f7009b00"), 0x9000),
    ("metadata 9C", none, bytes.fromhex("00f7009c00"), 0x9000),
    ("set mgmt no auth", none, apdu("00ffffff", "039b18" + "01" * 24), 0x6982),
    ("set mgmt touch", mgmt, apdu("00fffffe", "039b18" + "01" * 24), 0x6A86),
    ("set mgmt bad alg", mgmt, apdu("00ffffff", "049b18" + "01" * 24), 0x6A80),
    ("set mgmt bad length", mgmt, apdu("00ffffff", "089b18" + "01" * 24), 0x6A80),
    ("set mgmt not 9B", mgmt, apdu("00ffffff", "039a18" + "01" * 24), 0x6A80),
    ("set mgmt short", mgmt, apdu("00ffffff", "03"), 0x6A80),
    # Unknown instructions and nothing pending (§2)
    *[
        (f"INS {ins:02X}", none, bytes([0, ins, 0, 0, 0]), 0x6D00)
        for ins in (0x00, 0x84, 0xB0, 0xCA, 0xF9, 0xFB, 0xFE, 0x01)
    ],
    ("get response nothing pending", none, bytes.fromhex("00c0000000"), 0x6985),
]


@pytest.mark.parametrize(
    ("setup", "command", "sw"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_status_word(host: Host, setup: Setup, command: bytes, sw: int) -> None:
    setup(host)
    response = host.card.transmit(command)
    assert response[-2:].hex() == f"{sw:04x}"
    if sw != 0x9000:
        assert len(response) == 2, "errors carry no data"


def test_rsa_block_too_large_via_chaining(host: Host) -> None:
    pin(host)
    body = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, b"\xff" * 256))
    assert host.send(0x87, 0x07, Slot.AUTHENTICATION, body)[1] == 0x6A80


def test_put_data_too_big(host: Host) -> None:
    mgmt(host)
    body = Tlv(0x5C, bytes.fromhex("5fc105")) + Tlv(0x53, bytes(MAX_OBJECT_SIZE + 1))
    assert host.send(0xDB, 0x3F, 0xFF, body)[1] == 0x6A84


def test_foreign_select_leaves_piv_selected(host: Host) -> None:
    assert host.raw(apdu("00a40400", "a000000527471117"))[1] == 0x6A82
    out, sw = host.raw(apdu("00cb3fff", "5c017e", 0))
    assert sw == 0x9000 and out.startswith(b"\x7e\x12\x4f\x0b")


def test_piv_is_selected_after_power_on(card: VirtualCard) -> None:
    card.power_off()
    card.power_on()
    assert card.transmit(apdu("00cb3fff", "5c017e", 0))[-2:] == b"\x90\x00"


def test_wrong_management_key_answers_6982(host: Host) -> None:
    assert host.authenticate(key=bytes(24)) == 0x6982
    assert host.send(0xDB, 0x3F, 0xFF, bytes.fromhex("5c035fc109530100"))[1] == 0x6982


def test_mutual_auth_with_a_short_host_challenge_grants_nothing(host: Host) -> None:
    out = host.ok(0x87, 0x03, 0x9B, bytes.fromhex("7c028000"))
    witness = ecb(MgmtAlg.TDES, DEFAULT_MANAGEMENT_KEY, out[4:], decrypt=True)
    body = Tlv(0x7C, Tlv(0x80, witness) + Tlv(0x81, bytes(4)))
    assert host.send(0x87, 0x03, 0x9B, body)[1] == 0x6A80
    assert host.send(0xDB, 0x3F, 0xFF, bytes.fromhex("5c035fc109530100"))[1] == 0x6982
