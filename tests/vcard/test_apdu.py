"""APDU parsing, command chaining, response chaining, logging redaction."""

from __future__ import annotations

import logging

import pytest
from piv_host import PIN, Host, pad_pin

from vcard.apdu import TRAFFIC, CommandApdu, redact, redact_response
from vcard.card import VirtualCard
from vcard.constants import KeyType, Slot
from vcard.errors import WrongLength
from vcard.tlv import Tlv


@pytest.mark.parametrize(
    ("apdu", "data", "ne", "extended"),
    [
        ("00a40400", b"", None, False),  # case 1
        ("00cb3fff00", b"", 256, False),  # case 2S, Le 00 = 256
        ("00cb3fff08", b"", 8, False),
        ("0020008000", b"", 256, False),  # ykpiv's empty VERIFY: no data
        ("00a4040005a000000308", bytes.fromhex("a000000308"), None, False),  # case 3S
        ("00cb3fff035c017e00", bytes.fromhex("5c017e"), 256, False),  # case 4S
        ("00cb3fff035c017e10", bytes.fromhex("5c017e"), 16, False),
        ("00cb3fff000000", b"", 65536, True),  # case 2E
        ("00cb3fff000100", b"", 256, True),
        ("00cb3fff0000035c017e", bytes.fromhex("5c017e"), None, True),  # case 3E
        ("00cb3fff0000035c017e0000", bytes.fromhex("5c017e"), 65536, True),  # case 4E
        ("00cb3fff0000035c017e0102", bytes.fromhex("5c017e"), 0x102, True),
    ],
)
def test_parse_cases(apdu: str, data: bytes, ne: int | None, extended: bool) -> None:
    command = CommandApdu.parse(bytes.fromhex(apdu))
    assert (command.data, command.ne, command.extended) == (data, ne, extended)


@pytest.mark.parametrize(
    "apdu",
    [
        "",
        "00",
        "00a404",
        "00a4040002aa",
        "00a4040002aabbccdd",
        "00cb3fff0000",
        "00cb3fff000003aa",
        "00cb3fff00000000",
    ],
)
def test_parse_rejects_bad_lengths(apdu: str) -> None:
    with pytest.raises(WrongLength):
        CommandApdu.parse(bytes.fromhex(apdu))


def test_bad_lengths_answer_6700(host: Host) -> None:
    assert host.raw("00a4040002aa") == (b"", 0x6700)
    assert host.raw("00") == (b"", 0x6700)


@pytest.mark.parametrize(
    ("cla", "sw"),
    [
        (0x80, 0x6E00),
        (0xA0, 0x6E00),
        (0x40, 0x6E00),
        (0x01, 0x6881),
        (0x04, 0x6882),
        (0x0C, 0x6882),
    ],
)
def test_bad_cla(host: Host, cla: int, sw: int) -> None:
    assert host.raw(bytes([cla]) + bytes.fromhex("cb3fff035c017e00")) == (b"", sw)


def _chuid(host: Host) -> bytes:
    return host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c035fc102"))


def test_opensc_probe_then_reissue(host: Host) -> None:
    """OpenSC reads 8 bytes, drops the 61xx, and re-issues GET DATA (edge reference §2)."""
    full = _chuid(host)
    assert len(full) > 8
    out, sw = host.raw("00cb3fff055c035fc10208")
    assert out == full[:8] and sw == 0x6100 | len(full) - 8
    out, sw = host.raw("00cb3fff055c035fc10200")
    assert (out, sw) == (full, 0x9000)
    # The pending rest was dropped by the re-issued command.
    assert host.raw("00c0000000") == (b"", 0x6985)


def test_get_response_in_chunks_never_exceeds_le(host: Host) -> None:
    full = _chuid(host)
    out, sw = host.raw("00cb3fff055c035fc10204")
    assert len(out) == 4
    received = out
    while sw >> 8 == 0x61:
        more, sw = host.raw("00c0000005")
        assert len(more) <= 5
        received += more
    assert (received, sw) == (full, 0x9000)
    assert host.raw("00c0000000") == (b"", 0x6985)


def test_return_data_without_le(host: Host) -> None:
    """ykpiv sends GET DATA as case 3 and still expects the data."""
    out, sw = host.raw("00cb3fff035c017e")
    assert sw == 0x9000 and out[0] == 0x7E


def test_long_response_is_chunked_at_256(host: Host) -> None:
    host.verify()
    block = bytes(256)
    body = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, block))
    # Chain the command by hand, then check the first response chunk.
    _, sw = host.raw(bytes([0x10, 0x87, KeyType.RSA2048, Slot.AUTHENTICATION, 255]) + body[:255])
    assert sw == 0x9000
    rest = body[255:]
    out, sw = host.raw(
        bytes([0x00, 0x87, KeyType.RSA2048, Slot.AUTHENTICATION, len(rest)]) + rest + b"\x00"
    )
    assert len(out) == 256 and sw == 0x6108
    more, sw = host.raw("00c0000008")
    assert len(more) == 8 and sw == 0x9000
    assert (out + more)[:8] == bytes.fromhex("7c82010482820100")


def test_extended_le_returns_everything(host: Host) -> None:
    full = _chuid(host)
    out, sw = host.raw("00cb3fff0000055c035fc1020000")
    assert (out, sw) == (full, 0x9000)


def test_get_response_pending_is_dropped_by_any_command(host: Host) -> None:
    host.raw("00cb3fff055c035fc10208")
    host.raw("00fd000000")
    assert host.raw("00c0000000") == (b"", 0x6985)


def test_get_response_bad_p1p2(host: Host) -> None:
    host.raw("00cb3fff055c035fc10208")
    assert host.raw("00c0010000")[1] == 0x6A86


def test_command_chaining_joins_parts(host: Host) -> None:
    parts = bytes.fromhex("5c035fc102")
    assert host.raw(b"\x10\xcb\x3f\xff\x02" + parts[:2]) == (b"", 0x9000)
    assert host.raw(b"\x10\xcb\x3f\xff\x01" + parts[2:3]) == (b"", 0x9000)
    out, sw = host.raw(b"\x00\xcb\x3f\xff\x02" + parts[3:] + b"\x00")
    assert (out, sw) == (_chuid(host), 0x9000)


def test_command_chain_is_aborted_by_another_command(host: Host) -> None:
    assert host.raw(b"\x10\xcb\x3f\xff\x02\x5c\x03")[1] == 0x9000
    host.raw("00fd000000")
    # The final part alone is not a valid GET DATA template.
    assert host.raw(b"\x00\xcb\x3f\xff\x03\x5f\xc1\x02")[1] == 0x6A80


def test_chain_with_different_header_restarts(host: Host) -> None:
    assert host.raw(b"\x10\xcb\x3f\xff\x01\x5c")[1] == 0x9000
    # A chained part of another command starts a new chain ...
    assert host.raw(b"\x10\xdb\x3f\xff\x01\xaa")[1] == 0x9000
    # ... so the GET DATA's final part runs alone and is malformed.
    assert host.raw(b"\x00\xcb\x3f\xff\x04\x03\x5f\xc1\x02")[1] == 0x6A80
    out, sw = host.raw("00cb3fff055c035fc10200")
    assert sw == 0x9000 and out == _chuid(host)


SELECT_PIV = "00a4040009a00000030800001000"


@pytest.mark.parametrize(
    ("interloper", "sw"),
    [
        pytest.param("8020f446", 0x6E00, id="CLA-80"),  # refused before its header is read
        pytest.param("ffa4040009a00000030800001000", 0x6E00, id="CLA-FF"),
        pytest.param("0ccb3fff035c017e", 0x6882, id="secure-messaging"),
        pytest.param("01cb3fff035c017e", 0x6881, id="logical-channel"),
        pytest.param("db", 0x6700, id="1-byte"),
        pytest.param("00a4040005a000", 0x6700, id="Lc-too-long"),
        pytest.param("00c0000000", 0x6985, id="GET-RESPONSE"),  # not the chain's next part
        pytest.param("00fd000000", 0x9000, id="GET-VERSION"),
    ],
)
def test_any_other_command_ends_a_pending_chain(host: Host, interloper: str, sw: int) -> None:
    """ISO 7816-4 command chaining: a command that is not the chain's next part ends it,
    whatever its status word, so a later SELECT is never appended to the stale part."""
    assert host.raw("10a40400051122334455") == (b"", 0x9000)
    assert host.raw(interloper)[1] == sw
    out, sw = host.raw(SELECT_PIV)
    assert sw == 0x9000 and out[0] == 0x61


@pytest.mark.parametrize("interloper", ["8020f446", "db", "0ccb3fff035c017e", "00c0010000"])
def test_any_other_command_drops_a_pending_response(host: Host, interloper: str) -> None:
    """A pending 61xx is only for the GET RESPONSE that directly follows it."""
    assert host.raw("00cb3fff055c035fc10208")[1] >> 8 == 0x61
    assert host.raw(interloper)[1] != 0x9000
    assert host.raw("00c0000000") == (b"", 0x6985)


def test_redact_hides_pins_and_keys() -> None:
    verify = bytes.fromhex("0020008008") + pad_pin(PIN)
    assert PIN.hex() not in redact(verify).replace(" ", "")
    assert redact(verify).startswith("00 20 00 80 08")
    assert "313233" not in redact(bytes.fromhex("0024008010") + pad_pin(PIN) * 2).replace(" ", "")
    assert "0102030405" not in redact(bytes.fromhex("00ffffff1b039b18") + bytes(range(1, 25)))
    select = bytes.fromhex("00a4040005a000000308")
    assert redact(select) == select.hex(" ")
    assert redact_response(bytes.fromhex("7c0a8208aabbccddeeff00119000")) == "<12 bytes> 90 00"


def test_card_logs_traffic_redacted(card: VirtualCard, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(TRAFFIC, logger="vcard.card")
    card.transmit(bytes.fromhex("0020008008") + pad_pin(PIN))
    text = caplog.text.replace(" ", "")
    assert "0020008008" in text and PIN.hex() not in text
    assert any(r.levelno == TRAFFIC for r in caplog.records)
    assert logging.getLevelName(TRAFFIC) == "TRAFFIC"
