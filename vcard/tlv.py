# SPDX-License-Identifier: Apache-2.0
"""BER-TLV as PIV uses it (ISO/IEC 7816-4 §5.2; SP 800-73-4 Part 2 §3).

Tags of up to three bytes (``5FC105``, ``7F49``), definite lengths of one to three bytes
after the initial byte (``81``/``82``/``83``). Indefinite lengths (``80``) are rejected.
"""

from __future__ import annotations

from typing import Final

MAX_TAG_BYTES: Final[int] = 3
MAX_LENGTH: Final[int] = 0xFFFFFF


def _encode_tag(tag: int) -> bytes:
    if not 0 <= tag < 1 << (8 * MAX_TAG_BYTES):
        raise ValueError(f"tag out of range: {tag:#x}")
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def encode_length(length: int) -> bytes:
    """Minimal definite length: ``7F``, ``81 80``, ``82 01 00``, ``83 01 00 00``."""
    if length < 0 or length > MAX_LENGTH:
        raise ValueError(f"length out of range: {length}")
    if length < 0x80:
        return bytes([length])
    size = (length.bit_length() + 7) // 8
    return bytes([0x80 | size]) + length.to_bytes(size, "big")


def _parse_header(data: bytes, offset: int) -> tuple[int, int, int]:
    """Return ``(tag, value_offset, value_length)`` of the TLV starting at ``offset``."""
    end = len(data)
    if offset >= end:
        raise ValueError("TLV: no data")
    tag = data[offset]
    offset += 1
    if tag & 0x1F == 0x1F:
        for _ in range(MAX_TAG_BYTES - 1):
            if offset >= end:
                raise ValueError("TLV: truncated tag")
            byte = data[offset]
            tag = tag << 8 | byte
            offset += 1
            if not byte & 0x80:
                break
        else:
            raise ValueError("TLV: tag longer than 3 bytes")
    if offset >= end:
        raise ValueError("TLV: missing length")
    first = data[offset]
    offset += 1
    if first == 0x80:
        raise ValueError("TLV: indefinite length")
    if first < 0x80:
        length = first
    else:
        size = first & 0x7F
        if size > 3:
            raise ValueError("TLV: length field longer than 3 bytes")
        if offset + size > end:
            raise ValueError("TLV: truncated length")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    if offset + length > end:
        raise ValueError("TLV: value shorter than its length")
    return tag, offset, length


class Tlv(bytes):
    """One encoded TLV. ``Tlv(tag, value)`` builds it, ``Tlv(data)`` parses exactly one."""

    _tag: int
    _value_offset: int
    _value_length: int

    def __new__(cls, tag_or_data: int | bytes, value: bytes | None = None) -> Tlv:
        if isinstance(tag_or_data, int):
            body = b"" if value is None else bytes(value)
            data = _encode_tag(tag_or_data) + encode_length(len(body)) + body
        else:
            if value is not None:
                raise TypeError("Tlv(data) takes no value")
            data = bytes(tag_or_data)
        tag, value_offset, value_length = _parse_header(data, 0)
        if value_offset + value_length != len(data):
            raise ValueError("TLV: trailing data after the value")
        self = super().__new__(cls, data)
        self._tag, self._value_offset, self._value_length = tag, value_offset, value_length
        return self

    @property
    def tag(self) -> int:
        return self._tag

    @property
    def length(self) -> int:
        return self._value_length

    @property
    def value(self) -> bytes:
        return bytes(self[self._value_offset :])

    def __repr__(self) -> str:
        return f"Tlv(tag={self.tag:#04x}, value={self.value.hex()})"

    @classmethod
    def parse_list(cls, data: bytes) -> list[Tlv]:
        """All TLVs in ``data``, in order, duplicates kept."""
        result = []
        offset = 0
        while offset < len(data):
            _, value_offset, value_length = _parse_header(data, offset)
            end = value_offset + value_length
            result.append(cls(data[offset:end]))
            offset = end
        return result

    @classmethod
    def parse_dict(cls, data: bytes) -> dict[int, bytes]:
        """Tag to value; raises ``ValueError`` on a duplicate tag (PIV templates have none)."""
        result: dict[int, bytes] = {}
        for tlv in cls.parse_list(data):
            if tlv.tag in result:
                raise ValueError(f"TLV: duplicate tag {tlv.tag:#x}")
            result[tlv.tag] = tlv.value
        return result

    @classmethod
    def unpack(cls, tag: int, data: bytes) -> bytes:
        """The value of ``data``, which must be exactly one TLV with ``tag``."""
        tlv = cls(data)
        if tlv.tag != tag:
            raise ValueError(f"TLV: expected tag {tag:#x}, got {tlv.tag:#x}")
        return tlv.value
