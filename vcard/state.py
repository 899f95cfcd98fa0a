# SPDX-License-Identifier: Apache-2.0
"""Volatile security state of one card session (SP 800-73-4 Part 2 §2.4; edge ref. §2).

Everything here is lost on power-off and reset; a re-SELECT of PIV keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, unique


@unique
class Challenge(Enum):
    """Which 9B authentication step is pending."""

    EXTERNAL = "external"  # card sent a plain challenge; host returns it encrypted
    MUTUAL = "mutual"  # card sent an encrypted witness; host returns it decrypted


@dataclass
class SecurityState:
    """Access conditions met so far in this card session.

    :param pin_verified: VERIFY succeeded (PIN-once keys usable).
    :param pin_always_armed: VERIFY succeeded and no complete command has run since;
        only the next command may use a PIN-always key.
    :param pin_always_fresh: the command being executed directly follows a VERIFY.
    :param mgmt_authenticated: the 9B management key was proven.
    :param challenge: the pending 9B step and the plain value the card expects back.
    """

    pin_verified: bool = False
    pin_always_armed: bool = False
    pin_always_fresh: bool = False
    mgmt_authenticated: bool = False
    challenge: tuple[Challenge, bytes] | None = None

    def clear_pin(self) -> None:
        self.pin_verified = False
        self.pin_always_armed = False
        self.pin_always_fresh = False

    def begin_command(self) -> None:
        """A complete (non-chained, non-GET RESPONSE) command starts: spend the PIN-always arm."""
        self.pin_always_fresh = self.pin_always_armed
        self.pin_always_armed = False
