# SPDX-License-Identifier: Apache-2.0
"""What every signature format shares: the settings of a run, the one-line refusal of an
input, and the interface each format implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pyhanko.sign.timestamps import TimeStamper

from relay.docsign.longterm import Level, ValidationData
from relay.docsign.remote import Participant, SignError


class InputError(SignError):
    """This input cannot be signed as asked (unreadable, malformed, already signed, ...)."""


@dataclass(frozen=True)
class Appearance:
    """Where a PDF signature goes: its field, and for a visible one its page and box."""

    field: str | None = None
    page: int = 1
    """1 is the first page; -1 the last."""
    box: tuple[int, int, int, int] | None = None
    """x1, y1, x2, y2 in PDF points; None: an invisible signature."""


@dataclass(frozen=True)
class Run:
    """What applies to every document of one ``cardbridge sign``."""

    level: Level
    packaging: str
    timestamper: TimeStamper | None
    """For B-T and B-LT."""
    validation: ValidationData | None
    """For B-LT."""
    appearance: Appearance = Appearance()


class Format(Protocol):
    """One signature format (PAdES, CAdES, XAdES)."""

    name: str
    packagings: tuple[str, ...]
    """The packagings it offers, the default first (ETSI: enveloped, enveloping, detached)."""

    def output_name(self, source: Path, packaging: str) -> str:
        """The default file name of the signed output of ``source``."""
        ...

    def check(self, data: bytes, packaging: str) -> None:
        """Refuse what cannot be signed before anything is asked of the user or the server.

        :raises InputError: malformed, encrypted, already signed, of the wrong type.
        """
        ...

    async def sign(
        self, data: bytes, source: Path, out: Path, run: Run, participant: Participant
    ) -> bytes:
        """The signed output of ``data`` (read from ``source``, to be written to ``out``); the
        signature's digest goes through ``participant`` at most once (the caller makes it
        leave when the document fails before it).

        :raises SignError: this document could not be signed (an :class:`InputError`, or the
            batch's authorization failed).
        """
        ...
