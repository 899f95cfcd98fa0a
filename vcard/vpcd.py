"""The card side of vsmartcard's vpcd protocol: presents a card in pcscd's virtual reader.

vpcd (the reader driver inside pcscd) listens on TCP; the card connects to it. Every message
is a 2-byte big-endian length followed by the payload. vpcd sends four 1-byte control codes:
``00`` power off, ``01`` power on, ``02`` reset, ``04`` get ATR; only ``04`` is answered.
Anything else is a C-APDU, answered with the framed R-APDU. See vsmartcard
``doc/api.txt`` and ``piv-card-edge.md`` §1.

A 1-byte payload with any other value is an APDU a client sent (``SCardTransmit`` with one
byte): the card answers it (6700, too short) so the client is not left waiting. The framing
cannot tell a 1-byte APDU ``00``, ``01``, ``02`` or ``04`` from the control code: those are
taken as control codes, so ``00``-``02`` get no answer and leave that client waiting
(vpcd has no timeout), and ``04`` gets the ATR as its response.

Bounded time: the card answers every APDU within ``apdu_timeout`` seconds whatever its key
backend does; past it the link answers 6400 in its place (see ``_Connection``).

Latency: vpcd writes the length and the body separately, so this side sets ``TCP_NODELAY``,
re-arms ``TCP_QUICKACK`` after every read on Linux, and writes each frame with a single
``sendall``; otherwise Nagle meets delayed ACK and every APDU costs about 44 ms.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from typing import Final, Protocol

from vcard.apdu import redact
from vcard.constants import SW

__all__ = [
    "DEFAULT_APDU_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Card",
    "VpcdLink",
    "VpcdUnreachable",
    "frame",
    "parse_address",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 0x8C7B  # 35963, vpcd's first slot
DEFAULT_APDU_TIMEOUT: Final = 30.0
"""Seconds the card may take over one APDU (or power control) before the link answers 6400."""

CTRL_OFF: Final = 0x00
CTRL_ON: Final = 0x01
CTRL_RESET: Final = 0x02
CTRL_ATR: Final = 0x04
_POWER_CODES: Final = frozenset({CTRL_OFF, CTRL_ON, CTRL_RESET})

_MAX_PAYLOAD: Final = 0xFFFF
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0
_STAND_IN_POLL: Final = 0.05  # how often the stand-in looks whether the card is back
_EXECUTION_ERROR: Final = SW.EXECUTION_ERROR.to_bytes(2, "big")


class Card(Protocol):
    """What the link needs of a card (``vcard.card.VirtualCard`` fits).

    The link calls ``transmit`` and the power methods from one thread, one call at a time.
    ``atr`` may also be read from the link's watchdog thread while a call is running, so it
    must not depend on state that call changes.
    """

    @property
    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...

    def power_on(self) -> None: ...

    def power_off(self) -> None: ...

    def reset(self) -> None: ...


class VpcdUnreachable(ConnectionError):
    """vpcd does not accept connections at the given address (is pcscd running?)."""


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its 2-byte big-endian length (vsmartcard ``doc/api.txt``)."""
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError(f"vpcd frames carry at most {_MAX_PAYLOAD} bytes, not {len(payload)}")
    return struct.pack(">H", len(payload)) + payload


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (or ``PORT``, or ``[v6]:PORT``) into a host and a port number."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"not a HOST:PORT address: {text!r}") from None
    if not 0 < port < 0x10000:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


class VpcdLink:
    """Connects a card to vpcd and serves it until stopped.

    :param card: the card to present.
    :param host: vpcd's address.
    :param port: vpcd's TCP port (35963 for the first slot, +1 for the second).
    :param apdu_timeout: seconds the card may spend on one APDU or power control; past
        that the link answers 6400 in the card's place (see :class:`_Connection`).

    The link logs connections, control codes and overruns; APDUs are traced (redacted) by
    the card itself at the TRAFFIC level, so they are not logged twice.
    """

    def __init__(
        self,
        card: Card,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        apdu_timeout: float = DEFAULT_APDU_TIMEOUT,
    ) -> None:
        if not apdu_timeout > 0:
            raise ValueError(f"the APDU timeout must be positive, not {apdu_timeout}")
        self.card = card
        self.host = host
        self.port = port
        self.apdu_timeout = apdu_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.connected = threading.Event()
        """Set while a connection to vpcd is open (tests and the CLI wait on it)."""

    # -- connection -----------------------------------------------------------------------

    def connect(self, timeout: float = 2.0) -> socket.socket:
        """Open the TCP connection to vpcd, tuned for latency.

        :raises VpcdUnreachable: when nothing accepts the connection.
        """
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise VpcdUnreachable(
                f"cannot reach vpcd at {self.host}:{self.port} ({e.strerror or e}); "
                "is pcscd running with the vpcd reader?"
            ) from e
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def serve(self, sock: socket.socket) -> None:
        """Serve frames on ``sock`` until vpcd closes it or :meth:`stop` is called."""
        with self._lock:
            self._sock = sock
        self.connected.set()
        try:
            _Connection(self.card, sock, self.apdu_timeout, self._stop).serve()
        finally:
            self.connected.clear()
            with self._lock:
                self._sock = None
            sock.close()
            # pcscd sees the card removed; a later connection starts from a cold card.
            self.card.power_off()

    def run(self) -> None:
        """Present the card until :meth:`stop` is called.

        The first connection must succeed (else :class:`VpcdUnreachable`). Afterwards a
        dropped connection (pcscd restarted) is retried with exponential backoff.
        """
        sock = self.connect()
        logger.info(
            "card connected to vpcd at %s:%d (APDU timeout %.1f s)",
            self.host, self.port, self.apdu_timeout,
        )  # fmt: skip
        delay = _BACKOFF_FIRST
        while True:
            try:
                self.serve(sock)
            except OSError as e:
                if not self._stop.is_set():
                    logger.warning("vpcd connection lost: %s", e)
            if self._stop.is_set():
                return
            logger.info("vpcd closed the connection; reconnecting")
            while True:
                if self._stop.wait(delay):
                    return
                try:
                    sock = self.connect()
                except VpcdUnreachable as e:
                    delay = min(delay * 2, _BACKOFF_MAX)
                    logger.debug("%s; retrying in %.2f s", e, delay)
                    continue
                logger.info("card reconnected to vpcd at %s:%d", self.host, self.port)
                delay = _BACKOFF_FIRST
                break

    def stop(self) -> None:
        """Stop serving; safe from signal handlers and other threads."""
        self._stop.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)


class _Connection:
    """One vpcd connection: the card answers every frame within ``timeout`` seconds.

    vpcd waits for an APDU's answer without a timeout, holding pcscd's reader, so a card call
    that hangs (a remote backend whose server does not answer) would wedge every program
    that uses the reader. The frames are read and the card is called on the link's own
    thread, as without a bound, so the hot path costs one uncontended lock operation and no
    thread hop. One watchdog thread per connection sleeps until the deadline of the call
    in progress (or, while idle, for ``timeout``), so it does not wake per APDU. If a call
    overruns its deadline, the watchdog answers 6400 (``SW.EXECUTION_ERROR``) on the socket
    itself and stands in for the card until the call returns: it answers the ATR request,
    answers 6400 at once to every APDU, and queues power controls. The card itself is never
    entered by two threads.

    When the late call returns, its response is discarded and logged; the card thread takes
    the socket back at a frame boundary, then resets the card, as a reader deactivates a
    card that exceeds its waiting time (ISO/IEC 7816-3, WT): the discarded answer
    may have left response data pending (61xx) or a security state (PIN verified, 9B
    authenticated) the client never learnt of. The queued power controls follow, in order.
    """

    def __init__(
        self, card: Card, sock: socket.socket, timeout: float, stop: threading.Event
    ) -> None:
        self.card = card
        self.sock = sock
        self.timeout = timeout
        self._stop = stop
        self._quickack = getattr(socket, "TCP_QUICKACK", None)
        self._lock = threading.Lock()
        # The deadline of the card call in progress and the frame it serves (set by the card
        # thread alone), and whether the watchdog has answered for it; read under _lock.
        self._deadline: float | None = None
        self._request = b""
        self._overran = False
        # Hand-off between the card thread and the watchdog's stand-in (see _take_back).
        self._card_back = threading.Event()
        self._stand_in_done = threading.Event()
        self._vpcd_closed = False
        self._queued: list[int] = []
        self._refused = 0  # APDUs the stand-in answered 6400
        self._closed = threading.Event()

    def serve(self) -> None:
        """Serve frames until vpcd closes the connection or the link stops."""
        watchdog = threading.Thread(target=self._watch, name="vpcd-watchdog", daemon=True)
        watchdog.start()
        try:
            while not self._stop.is_set() and not self._vpcd_closed:
                if self._queued:
                    self._call(bytes([self._queued.pop(0)]))
                    continue
                payload = self._read_frame()
                if payload is None:
                    return
                if len(payload) == 1 and payload[0] == CTRL_ATR:
                    self._send(self.card.atr)
                    continue
                response = self._call(payload)
                if response is not None:
                    self._send(response)
        finally:
            self._closed.set()
            watchdog.join()

    # -- the card thread's side -------------------------------------------------------------

    def _call(self, request: bytes) -> bytes | None:
        """Run one APDU or power control under the watchdog; the response to send, or None
        (a power control, or a call that overran and was answered by the watchdog)."""
        started = time.monotonic()
        # Armed without the lock: one attribute store, which the watchdog sees whole.
        self._request = request
        self._deadline = started + self.timeout
        result: bytes | None = None
        try:
            if _is_power(request):
                self._power(request[0])
            else:
                result = self.card.transmit(request)
        finally:
            with self._lock:
                self._deadline = None
                overran = self._overran
            if overran:
                self._take_back()
        if not overran:
            return result
        late = "" if result is None else f"; its late response (SW {result[-2:].hex()}) dropped"
        logger.warning(
            "the card returned from %s after %.1f s%s; %d APDU(s) answered 6400 meanwhile",
            _describe(request), time.monotonic() - started, late, self._refused,
        )  # fmt: skip
        self._refused = 0
        if not _is_power(request):
            self._queued.insert(0, CTRL_RESET)
        return None

    def _power(self, code: int) -> None:
        logger.debug("vpcd: %s", _describe(bytes([code])))
        if code == CTRL_OFF:
            self.card.power_off()
        elif code == CTRL_ON:
            self.card.power_on()
        else:
            self.card.reset()

    def _take_back(self) -> None:
        """Wait until the stand-in has stopped reading at a frame boundary."""
        self._card_back.set()
        self._stand_in_done.wait()
        self._card_back.clear()
        self._stand_in_done.clear()
        with self._lock:
            self._overran = False

    # -- the watchdog's side ----------------------------------------------------------------

    def _watch(self) -> None:
        """Sleep until the deadline of the call in progress; stand in for the card past it."""
        while not self._closed.is_set():
            with self._lock:
                now = time.monotonic()
                deadline = None if self._overran else self._deadline
                overdue = deadline is not None and now >= deadline
                self._overran = self._overran or overdue
                request = self._request
            if overdue:
                self._stand_in(request)
            else:
                self._closed.wait(self.timeout if deadline is None else deadline - now)

    def _stand_in(self, request: bytes) -> None:
        """Answer for the card until its late call returns (see the class docstring)."""
        stuck = _describe(request)
        try:
            if _is_power(request):
                logger.error(
                    "the card did not finish %s within %.1f s (--apdu-timeout); answering in "
                    "its place until it does", stuck, self.timeout,
                )  # fmt: skip
            else:
                logger.error(
                    "the card did not answer %s within %.1f s (--apdu-timeout): answered "
                    "6400, and 6400 to every APDU until it does", stuck, self.timeout,
                )  # fmt: skip
                self._send(_EXECUTION_ERROR)
            while not self._card_back.is_set():
                readable, _, _ = select.select([self.sock], [], [], _STAND_IN_POLL)
                if not readable:
                    continue
                payload = self._read_frame()
                if payload is None:
                    self._vpcd_closed = True
                    return
                if len(payload) == 1 and payload[0] == CTRL_ATR:
                    self._send(self.card.atr)
                elif _is_power(payload):
                    self._queued.append(payload[0])
                else:
                    logger.debug("answered 6400 to %s: the card is busy", _describe(payload))
                    self._refused += 1
                    self._send(_EXECUTION_ERROR)
        except OSError as e:  # the connection broke
            logger.debug("stand-in ends: %s", e)
            self._vpcd_closed = True
        finally:
            self._stand_in_done.set()

    # -- frames -----------------------------------------------------------------------------

    def _read_frame(self) -> bytes | None:
        """The next frame's payload; None when vpcd closed the connection."""
        header = self._recv_exact(2)
        if header is None:
            return None
        (length,) = struct.unpack(">H", header)
        return self._recv_exact(length)

    def _recv_exact(self, size: int) -> bytes | None:
        """Read exactly ``size`` bytes; ``None`` if the peer closed the connection first."""
        buf = bytearray()
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                return None
            buf += chunk
            if self._quickack is not None:
                self.sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
        return bytes(buf)

    def _send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))


def _is_power(payload: bytes) -> bool:
    return len(payload) == 1 and payload[0] in _POWER_CODES


def _describe(request: bytes) -> str:
    """A frame for logs: the power control's name, or the APDU with secrets redacted."""
    if _is_power(request):
        return {CTRL_OFF: "power off", CTRL_ON: "power on", CTRL_RESET: "reset"}[request[0]]
    return f"APDU {redact(request)}"
