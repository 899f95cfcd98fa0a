# SPDX-License-Identifier: Apache-2.0
"""``VirtualCard``: the card's APDU layer in front of the PIV application.

ISO/IEC 7816-4 §5.1 (command and response chaining, GET RESPONSE) and SP 800-73-4 Part 2
§3.1.1 (SELECT). ``transmit`` is the one place that turns exceptions into status words.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from typing import Final

from vcard.apdu import (
    EXTENDED_MAX_NE,
    SHORT_MAX_NE,
    TRAFFIC,
    CommandApdu,
    redact,
    redact_response,
)
from vcard.constants import ATR, PIV_AID_MIN_PREFIX, SW, Aid, Ins, Slot
from vcard.errors import (
    CardError,
    ClaNotSupported,
    ConditionsNotSatisfied,
    IncorrectP1P2,
    LogicalChannelNotSupported,
    NotFound,
    SecureMessagingNotSupported,
    WrongLength,
)
from vcard.keys import KeyBackend
from vcard.piv import PivApplet
from vcard.state import SecurityState

logger = logging.getLogger(__name__)

#: Largest de-chained command this card accepts (a certificate object plus headers).
MAX_CHAIN: Final[int] = 0x10000
#: Largest response body over vpcd (2-byte frame length, minus the status word).
MAX_RESPONSE_CHUNK: Final[int] = EXTENDED_MAX_NE - 3


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


class VirtualCard:
    """A PIV card: feed it command APDUs, get response APDUs.

    :param backend: where keys, objects and PIN state live.
    :param pin_always_slots: slots that need a VERIFY right before every use; None keeps
        each key's own policy (9C always). See ``PivApplet``.
    """

    atr: bytes = ATR

    def __init__(
        self, backend: KeyBackend, *, pin_always_slots: Collection[Slot] | None = None
    ) -> None:
        self.applet = PivApplet(backend, pin_always_slots=pin_always_slots)
        self.state = SecurityState()
        self._pending = b""
        self._chain: tuple[int, int, int] | None = None
        self._chain_data = b""

    # Power ----------------------------------------------------------------------------

    def power_on(self) -> None:
        """Cold start: fresh volatile state, PIV selected."""
        self.reset()

    def power_off(self) -> None:
        """Power loss: all volatile state is gone."""
        self.reset()

    def reset(self) -> None:
        """Warm reset: forget PIN, management-key auth, pending data and chains, here and in
        the backend (``KeyBackend.power_cycle``)."""
        self.applet.backend.power_cycle()
        self.state = SecurityState()
        self._pending = b""
        self._chain = None
        self._chain_data = b""

    # APDUs ------------------------------------------------------------------------------

    def transmit(self, apdu: bytes) -> bytes:
        """Process one command APDU; always returns ``data || SW1 SW2``, never raises."""
        if logger.isEnabledFor(TRAFFIC):
            logger.log(TRAFFIC, "> %s", redact(apdu))
        try:
            response = self._transmit(apdu)
        except CardError as e:
            response = _sw(e.sw)
        except ValueError as e:
            logger.debug("incorrect data: %s", e)
            response = _sw(SW.INCORRECT_DATA)
        except Exception:
            logger.exception("card error while processing %s", redact(apdu))
            response = _sw(SW.UNKNOWN)
        if logger.isEnabledFor(TRAFFIC):
            logger.log(TRAFFIC, "< %s", redact_response(response))
        return response

    def _transmit(self, raw: bytes) -> bytes:
        # Whatever this command turns out to be, even one refused before its header is read
        # (6700, 6E00), it ends the pending response unless it is GET RESPONSE, and the
        # pending chain unless it is the chain's next part (ISO 7816-4 §5.1, command and
        # response chaining): nothing another client left behind is glued to a later command.
        pending, self._pending = self._pending, b""
        chain, chain_data = self._chain, self._chain_data
        self._abort_chain()
        command = CommandApdu.parse(raw)
        _check_cla(command.cla)
        if command.ins == Ins.GET_RESPONSE and not command.chained:
            return self._get_response(command, pending)
        header = (command.ins, command.p1, command.p2)
        if chain != header:
            chain_data = b""
        if command.chained:
            if len(chain_data) + len(command.data) > MAX_CHAIN:
                raise WrongLength("command chain too long")
            self._chain, self._chain_data = header, chain_data + command.data
            return _sw(SW.OK)
        if chain_data:
            command = replace(command, data=chain_data + command.data)
        self.state.begin_command()
        if command.ins == Ins.SELECT:
            data = self._select(command)
        else:
            data = self.applet.process(command, self.state)
        return self._respond(data, command)

    def _abort_chain(self) -> None:
        self._chain, self._chain_data = None, b""

    def _respond(self, data: bytes, command: CommandApdu) -> bytes:
        """Send at most Ne bytes (256 without Le), keep the rest for GET RESPONSE."""
        if command.ne is None:
            limit = SHORT_MAX_NE
        elif command.extended:
            limit = min(command.ne, MAX_RESPONSE_CHUNK)
        else:
            limit = min(command.ne, SHORT_MAX_NE)
        if len(data) <= limit:
            return data + _sw(SW.OK)
        self._pending = data[limit:]
        return data[:limit] + _sw(SW.MORE_DATA | min(len(self._pending), 0x100) & 0xFF)

    def _get_response(self, command: CommandApdu, pending: bytes) -> bytes:
        """GET RESPONSE (ISO 7816-4 §7.6.1): the next chunk of the ``pending`` response."""
        if command.p1p2 != 0:
            raise IncorrectP1P2("GET RESPONSE takes P1P2=0000")
        if not pending:
            raise ConditionsNotSatisfied("no response data pending")
        return self._respond(pending, command)

    def _select(self, command: CommandApdu) -> bytes:
        """SELECT by AID (Part 2 §3.1.1): any 5-11-byte prefix of the PIV AID.

        Foreign AIDs and file selections answer 6A82 and leave PIV selected; re-selecting
        PIV keeps the security state (the PIN stays verified).
        """
        if command.p1 != 0x04:
            if command.p1 in (0x00, 0x01, 0x02, 0x08, 0x09):
                raise NotFound("this card has no file system")
            raise IncorrectP1P2("SELECT P1 must be 04")
        if command.p2 not in (0x00, 0x0C):
            raise IncorrectP1P2("SELECT P2 must be 00 or 0C")
        aid = command.data
        if not (PIV_AID_MIN_PREFIX <= len(aid) <= len(Aid.PIV) and Aid.PIV.startswith(aid)):
            raise NotFound(f"no application {aid.hex()}")
        if command.p2 == 0x0C:
            return b""
        return self.applet.application_property_template()


def _check_cla(cla: int) -> None:
    """CLA 00 or 10 only (ISO 7816-4 §5.4.1): no channels, no secure messaging."""
    if cla & 0xE0:
        raise ClaNotSupported(f"CLA {cla:02X}")
    if cla & 0x03:
        raise LogicalChannelNotSupported(f"CLA {cla:02X}")
    if cla & 0x0C:
        raise SecureMessagingNotSupported(f"CLA {cla:02X}")
