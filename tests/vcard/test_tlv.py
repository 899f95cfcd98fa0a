"""BER-TLV: hex tables, yubikit's length edges, multi-byte tags, rejects."""

from __future__ import annotations

import pytest

from vcard.tlv import Tlv, encode_length


@pytest.mark.parametrize(
    ("tag", "value", "encoded"),
    [
        (0x53, b"", "5300"),
        (0x70, b"\x01\x02", "70020102"),
        (0x7E, b"\xaa", "7e01aa"),
        (0x7F49, b"\x86\x00", "7f49028600"),
        (0x5FC105, b"\x00", "5fc1050100"),
        (0x5F2F, b"\x40\x00", "5f2f024000"),
        (0x00, b"", "0000"),
    ],
)
def test_encode_and_parse(tag: int, value: bytes, encoded: str) -> None:
    tlv = Tlv(tag, value)
    assert tlv.hex() == encoded
    parsed = Tlv(bytes.fromhex(encoded))
    assert (parsed.tag, parsed.value, parsed.length) == (tag, value, len(value))


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, "00"),
        (0x7F, "7f"),
        (0x80, "8180"),
        (0xFF, "81ff"),
        (0x100, "820100"),
        (0xFFFF, "82ffff"),
        (0x10000, "83010000"),
    ],
)
def test_length_edges(length: int, header: str) -> None:
    assert encode_length(length).hex() == header
    tlv = Tlv(0x53, bytes(length))
    assert tlv[1:].startswith(bytes.fromhex(header))
    assert Tlv(bytes(tlv)).length == length


def test_non_minimal_lengths_are_accepted() -> None:
    assert Tlv(bytes.fromhex("538200020102")).value == b"\x01\x02"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("", "no data"),
        ("53", "missing length"),
        ("5380", "indefinite"),
        ("5384000000010000", "longer than 3"),
        ("5302aa", "shorter"),
        ("538201", "truncated length"),
        ("5f", "truncated tag"),
        ("5fc1", "truncated tag"),
        ("5fc1810100", "tag longer than 3"),
        ("530100ff", "trailing"),
    ],
)
def test_rejects(data: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Tlv(bytes.fromhex(data))


def test_parse_list_keeps_order_and_duplicates() -> None:
    items = Tlv.parse_list(bytes.fromhex("82008100810101"))
    assert [(t.tag, t.value) for t in items] == [(0x82, b""), (0x81, b""), (0x81, b"\x01")]


def test_parse_dict_rejects_duplicates() -> None:
    assert Tlv.parse_dict(bytes.fromhex("82008101aa")) == {0x82: b"", 0x81: b"\xaa"}
    with pytest.raises(ValueError, match="duplicate"):
        Tlv.parse_dict(bytes.fromhex("82008200"))


def test_unpack_checks_the_tag() -> None:
    assert Tlv.unpack(0x7C, bytes.fromhex("7c028200")) == b"\x82\x00"
    with pytest.raises(ValueError, match="expected tag 0x7c"):
        Tlv.unpack(0x7C, bytes.fromhex("7d028200"))


def test_nested_build_reads_like_the_spec() -> None:
    tlv = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, b"\x01\x02"))
    assert tlv.hex() == "7c06820081020102"


@pytest.mark.parametrize("tag", [-1, 0x1000000])
def test_tag_range(tag: int) -> None:
    with pytest.raises(ValueError):
        Tlv(tag, b"")
