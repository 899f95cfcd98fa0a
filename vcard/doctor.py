# SPDX-License-Identifier: Apache-2.0
"""``cardbridge card doctor``: checks the local PC/SC stack as a client would, with pyscard.

Each check says what it found and, when it fails, what to do about it: pcscd reachable,
the vpcd reader listed, a card present, the card answering SELECT PIV, and the APDU round
trip time through pcscd and vpcd (target 0.2 ms; ~44 ms means the Nagle trap).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final

from smartcard import scard

__all__ = [
    "SELECT_PIV",
    "Check",
    "PcscError",
    "PcscReader",
    "card_answers",
    "card_ready",
    "find_reader",
    "list_readers",
    "percentile",
    "run_checks",
]

SELECT_PIV: Final = bytes.fromhex("00A4040009A00000030800001000")
GET_DISCOVERY: Final = bytes.fromhex("00CB3FFF035C017E00")

READER_HINTS: Final = ("vpcd", "virtual pcd")
"""Substrings (case-insensitive) that name a vsmartcard vpcd reader."""

RTT_TARGET_MS: Final = 0.2
RTT_NAGLE_MS: Final = 5.0  # anything near this is the Nagle/delayed-ACK trap, not the card


class PcscError(Exception):
    """A PC/SC call failed; ``code`` is the SCARD_* result."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what}: {scard.SCardGetErrorMessage(code)} (0x{code & 0xFFFFFFFF:08X})")
        self.code = code


def _check(result: int, what: str) -> None:
    if result != scard.SCARD_S_SUCCESS:
        raise PcscError(what, result)


@contextmanager
def _context() -> Iterator[Any]:
    result, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _check(result, "connecting to pcscd")
    try:
        yield ctx
    finally:
        scard.SCardReleaseContext(ctx)


def list_readers() -> list[str]:
    """The readers pcscd knows. :raises PcscError: when pcscd is not reachable."""
    with _context() as ctx:
        result, readers = scard.SCardListReaders(ctx, [])
        if result == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        _check(result, "listing readers")
        return [str(r) for r in readers]


def find_reader(readers: Sequence[str], hint: str | None = None) -> str | None:
    """The first reader whose name contains ``hint`` (default: any vpcd reader)."""
    hints = (hint.lower(),) if hint else READER_HINTS
    for name in readers:
        if any(h in name.lower() for h in hints):
            return name
    return None


class PcscReader:
    """A raw PC/SC connection to the card in one reader (shared mode, T=1 or T=0).

    :param reader: the full reader name, as :func:`list_readers` returns it.
    """

    def __init__(self, reader: str) -> None:
        self.reader = reader
        result, self._ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        _check(result, "connecting to pcscd")
        result, self._card, self._protocol = scard.SCardConnect(
            self._ctx,
            reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        if result != scard.SCARD_S_SUCCESS:
            scard.SCardReleaseContext(self._ctx)
            raise PcscError(f"connecting to the card in {reader!r}", result)
        self._closed = False

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        """Send one C-APDU; returns the response data and the status word."""
        result, response = scard.SCardTransmit(self._card, self._protocol, list(apdu))
        _check(result, "transmitting an APDU")
        raw = bytes(response)
        if len(raw) < 2:
            raise PcscError("the card answered without a status word", scard.SCARD_F_UNKNOWN_ERROR)
        return raw[:-2], int.from_bytes(raw[-2:], "big")

    @property
    def atr(self) -> bytes:
        """The card's ATR as pcscd reports it."""
        result, _name, _state, _protocol, atr = scard.SCardStatus(self._card)
        _check(result, "reading the card status")
        return bytes(atr)

    def close(self, disposition: int = scard.SCARD_LEAVE_CARD) -> None:
        """Disconnect (``SCARD_RESET_CARD`` resets the card for the next client); idempotent."""
        if self._closed:
            return
        self._closed = True
        scard.SCardDisconnect(self._card, disposition)
        scard.SCardReleaseContext(self._ctx)

    def __enter__(self) -> PcscReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def card_answers(reader: str) -> bool:
    """Whether a card is in ``reader`` and answers SELECT PIV (9000 or 61xx)."""
    try:
        with PcscReader(reader) as conn:
            _, sw = conn.transmit(SELECT_PIV)
    except PcscError:
        return False
    return sw == 0x9000 or sw >> 8 == 0x61


def card_ready(reader: str) -> bool:
    """A card that answers twice, a moment apart: vpcd can drop a just-connected card once
    (the link then reconnects), so one answer right after connecting proves little."""
    if not card_answers(reader):
        return False
    time.sleep(0.3)
    return card_answers(reader)


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``samples`` (which must not be empty)."""
    ordered = sorted(samples)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Check:
    """One diagnostic: what was checked, whether it passed, what was seen, what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        """The check as plain data for ``--json``."""
        return asdict(self)


def run_checks(reader_hint: str | None = None, rounds: int = 500) -> list[Check]:
    """Run the checks in order, stopping at the first that leaves nothing to test further.

    :param reader_hint: substring of the reader name (default: any vpcd reader).
    :param rounds: number of APDUs timed for the round-trip check.
    """
    checks: list[Check] = []
    try:
        readers = list_readers()
    except PcscError as e:
        checks.append(
            Check(
                "pcscd reachable",
                False,
                str(e),
                "start pcscd with the vpcd reader: scripts/lib/pcscd.sh (pcscd_start), or "
                "`pcscd -f -c etc/reader.conf.d`",
            )
        )
        return checks
    checks.append(Check("pcscd reachable", True, f"{len(readers)} reader(s)"))

    reader = find_reader(readers, reader_hint)
    if reader is None:
        listed = ", ".join(readers) or "none"
        checks.append(
            Check(
                "vpcd reader listed",
                False,
                f"no reader matching {reader_hint or 'vpcd'!r}; readers: {listed}",
                "install vsmartcard-vpcd and run pcscd with etc/reader.conf.d "
                "(its LIBPATH must be /usr/lib/pcsc/drivers/serial/libifdvpcd.so)",
            )
        )
        return checks
    checks.append(Check("vpcd reader listed", True, reader))

    try:
        conn = PcscReader(reader)
    except PcscError as e:
        checks.append(
            Check(
                "card present",
                False,
                str(e),
                "start the card: `cardbridge card run --soft DIR` (create DIR with "
                "`cardbridge card init-soft DIR`), with --vpcd pointing at this reader's port",
            )
        )
        return checks
    with conn:
        checks.append(Check("card present", True, f"ATR {conn.atr.hex().upper()}"))
        data, sw = conn.transmit(SELECT_PIV)
        if sw != 0x9000 and sw >> 8 != 0x61:
            checks.append(
                Check(
                    "card answers SELECT PIV",
                    False,
                    f"status word {sw:04X}",
                    "the card in the reader is not a PIV card; check what is connected to vpcd",
                )
            )
            return checks
        checks.append(Check("card answers SELECT PIV", True, f"status word {sw:04X}"))
        checks.append(_round_trip(conn, rounds))
    return checks


def _round_trip(conn: PcscReader, rounds: int) -> Check:
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        conn.transmit(GET_DISCOVERY)
        timings.append((time.perf_counter() - start) * 1000)
    p50, p99 = statistics.median(timings), percentile(timings, 99)
    detail = f"p50 {p50:.3f} ms, p99 {p99:.3f} ms over {rounds} APDUs (target {RTT_TARGET_MS} ms)"
    if p50 >= RTT_NAGLE_MS:
        return Check(
            "APDU round trip",
            False,
            detail,
            "the card side pays Nagle + delayed ACK: it must set TCP_NODELAY and write each "
            "frame at once (cardbridge's own card does)",
        )
    return Check("APDU round trip", True, detail)
