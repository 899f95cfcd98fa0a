# SPDX-License-Identifier: Apache-2.0
"""Command APDU parsing (ISO/IEC 7816-4 §5.1) and redacted APDU logging.

Cases 1-4, short and extended. ykpiv's empty VERIFY ``00 20 00 80 00`` is case 2 with
Le=256, i.e. no data, which is what it means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from vcard.constants import Ins
from vcard.errors import WrongLength

#: Log level for APDU traffic, below DEBUG (yubikit's convention).
TRAFFIC: Final[int] = 5
logging.addLevelName(TRAFFIC, "TRAFFIC")

SHORT_MAX_NE: Final[int] = 256
EXTENDED_MAX_NE: Final[int] = 65536
CLA_CHAINING: Final[int] = 0x10

#: Commands whose data may be logged in full; every other command's data is redacted
#: (VERIFY, CHANGE REFERENCE, RESET RETRY, GENERAL AUTHENTICATE, SET MANAGEMENT KEY ...).
_PUBLIC_INS: Final = frozenset(
    {
        Ins.SELECT,
        Ins.GET_DATA,
        Ins.GET_RESPONSE,
        Ins.GENERATE_ASYMMETRIC,
        Ins.PUT_DATA,
        Ins.GET_METADATA,
        Ins.GET_SERIAL,
        Ins.GET_VERSION,
    }
)


@dataclass(frozen=True)
class CommandApdu:
    """A parsed command.

    :param ne: the maximum response length the host accepts (Le; 256 or 65536 for 00),
        or None when the command has no Le field.
    :param extended: whether the command used extended length fields.
    """

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int | None = None
    extended: bool = False

    @property
    def p1p2(self) -> int:
        return self.p1 << 8 | self.p2

    @property
    def chained(self) -> bool:
        """A non-final part of a command chain (CLA bit 0x10)."""
        return bool(self.cla & CLA_CHAINING)

    @classmethod
    def parse(cls, apdu: bytes) -> CommandApdu:
        """Decode the four cases, short or extended.

        :raises WrongLength: the length fields do not match the APDU (6700).
        """
        size = len(apdu)
        if size < 4:
            raise WrongLength("APDU shorter than 4 bytes")
        cla, ins, p1, p2 = apdu[:4]
        if size == 4:  # case 1
            return cls(cla, ins, p1, p2)
        if size == 5:  # case 2S
            return cls(cla, ins, p1, p2, ne=apdu[4] or SHORT_MAX_NE)
        if apdu[4]:  # case 3S / 4S
            lc = apdu[4]
            if size == 5 + lc:
                return cls(cla, ins, p1, p2, bytes(apdu[5:]))
            if size == 6 + lc:
                return cls(cla, ins, p1, p2, bytes(apdu[5:-1]), ne=apdu[-1] or SHORT_MAX_NE)
            raise WrongLength(f"Lc={lc} does not match a {size}-byte APDU")
        if size == 7:  # case 2E
            return cls(cla, ins, p1, p2, ne=_extended_ne(apdu[5:7]), extended=True)
        lc = int.from_bytes(apdu[5:7], "big")
        if lc and size == 7 + lc:  # case 3E
            return cls(cla, ins, p1, p2, bytes(apdu[7:]), extended=True)
        if lc and size == 9 + lc:  # case 4E
            ne = _extended_ne(apdu[-2:])
            return cls(cla, ins, p1, p2, bytes(apdu[7:-2]), ne=ne, extended=True)
        raise WrongLength(f"extended Lc={lc} does not match a {size}-byte APDU")


def _extended_ne(le: bytes) -> int:
    return int.from_bytes(le, "big") or EXTENDED_MAX_NE


def redact(apdu: bytes) -> str:
    """Hex of a command APDU for logs, with the data of secret-bearing commands hidden.

    Only the header and length are shown for VERIFY, CHANGE REFERENCE DATA, RESET RETRY
    COUNTER, GENERAL AUTHENTICATE (digests, ciphertexts, management-key challenges),
    SET MANAGEMENT KEY and any unknown instruction.
    """
    if len(apdu) <= 5 or apdu[1] in _PUBLIC_INS:
        return apdu.hex(" ")
    return f"{apdu[:5].hex(' ')} <{len(apdu) - 5} bytes redacted>"


def redact_response(response: bytes) -> str:
    """A response for logs: its length and status word, never its data.

    Responses carry decrypted data, ECDH secrets and management-key challenges.
    """
    if len(response) < 2:
        return response.hex(" ")
    return f"<{len(response) - 2} bytes> {response[-2:].hex(' ')}"
