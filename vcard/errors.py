# SPDX-License-Identifier: Apache-2.0
"""Card errors: each carries the status word the card answers with.

Handlers and key backends only raise these; ``VirtualCard.transmit`` is the one place that
turns them (and ``ValueError`` -> 6A80, anything else -> 6F00) into status words.
"""

from __future__ import annotations

from vcard.constants import SW


class CardError(Exception):
    """A command failed with status word ``sw``."""

    sw: int = SW.UNKNOWN

    def __init__(self, message: str = "", sw: int | None = None) -> None:
        if sw is not None:
            self.sw = sw
        super().__init__(message or f"status word {self.sw:04X}")


class ExecutionError(CardError):
    """The command could not be executed and nothing changed (ISO 7816-4 SW 6400): the key
    backend failed, is unreachable or did not answer in time. The client may retry."""

    sw = SW.EXECUTION_ERROR


class WrongLength(CardError):
    sw = SW.WRONG_LENGTH


class LogicalChannelNotSupported(CardError):
    sw = SW.LOGICAL_CHANNEL_NOT_SUPPORTED


class SecureMessagingNotSupported(CardError):
    sw = SW.SECURE_MESSAGING_NOT_SUPPORTED


class SecurityStatusNotSatisfied(CardError):
    sw = SW.SECURITY_STATUS_NOT_SATISFIED


class ConditionsNotSatisfied(CardError):
    sw = SW.CONDITIONS_NOT_SATISFIED


class IncorrectData(CardError):
    sw = SW.INCORRECT_DATA


class NotFound(CardError):
    sw = SW.FILE_NOT_FOUND


class NoSpace(CardError):
    sw = SW.NO_SPACE


class IncorrectP1P2(CardError):
    sw = SW.INCORRECT_P1P2


class ReferenceNotFound(CardError):
    sw = SW.REFERENCE_NOT_FOUND


class InsNotSupported(CardError):
    sw = SW.INS_NOT_SUPPORTED


class ClaNotSupported(CardError):
    sw = SW.CLA_NOT_SUPPORTED


class PinBlocked(CardError):
    """The PIN (or PUK) has no tries left (6983)."""

    sw = SW.AUTH_METHOD_BLOCKED


class PinIncorrect(CardError):
    """A wrong PIN or PUK: 63Cx with x tries left, or 6983 once none are left."""

    def __init__(self, retries: int) -> None:
        self.retries = max(0, retries)
        sw = SW.VERIFY_FAIL | min(self.retries, 0xF) if self.retries else SW.AUTH_METHOD_BLOCKED
        super().__init__(f"wrong PIN, {self.retries} tries left", sw)


class NotACard(ValueError):
    """A directory (or other store) does not hold a card."""
