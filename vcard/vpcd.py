# SPDX-License-Identifier: Apache-2.0
"""The card side of vsmartcard's vpcd protocol: presents a card in pcscd's virtual reader.

vpcd (the reader driver inside pcscd) listens on TCP; the card connects to it. Every message
is a 2-byte big-endian length followed by the payload. A 1-byte payload is a control code:
``00`` power off, ``01`` power on, ``02`` reset, ``04`` get ATR; only ``04`` is answered.
Anything else is a C-APDU, answered with the framed R-APDU. See vsmartcard
``doc/api.txt`` and ``piv-card-edge.md`` §1.

Latency: vpcd writes the length and the body separately, so this side sets ``TCP_NODELAY``,
re-arms ``TCP_QUICKACK`` after every read on Linux, and writes each frame with a single
``sendall``; otherwise Nagle meets delayed ACK and every APDU costs about 44 ms.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from typing import Final, Protocol

__all__ = [
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

CTRL_OFF: Final = 0x00
CTRL_ON: Final = 0x01
CTRL_RESET: Final = 0x02
CTRL_ATR: Final = 0x04

_MAX_PAYLOAD: Final = 0xFFFF
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0


class Card(Protocol):
    """What the link needs of a card (``vcard.card.VirtualCard`` fits)."""

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

    The link logs connections and control codes; APDUs are traced (redacted) by the card
    itself at the TRAFFIC level, so they are not logged twice.
    """

    def __init__(
        self,
        card: Card,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
    ) -> None:
        self.card = card
        self.host = host
        self.port = port
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.connected = threading.Event()
        """Set while a connection to vpcd is open (tests and the CLI wait on it)."""

    # -- one frame ------------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes | None:
        """Answer one vpcd message: the response payload, or ``None`` when none is due."""
        if len(payload) == 1:
            code = payload[0]
            if code == CTRL_ATR:
                return self.card.atr
            if code == CTRL_OFF:
                logger.debug("vpcd: power off")
                self.card.power_off()
            elif code == CTRL_ON:
                logger.debug("vpcd: power on")
                self.card.power_on()
            elif code == CTRL_RESET:
                logger.debug("vpcd: reset")
                self.card.reset()
            else:
                logger.warning("vpcd: unknown control code %02X ignored", code)
            return None
        return self.card.transmit(payload)

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
        quickack = getattr(socket, "TCP_QUICKACK", None)
        try:
            while not self._stop.is_set():
                header = _recv_exact(sock, 2, quickack)
                if header is None:
                    return
                (length,) = struct.unpack(">H", header)
                payload = _recv_exact(sock, length, quickack)
                if payload is None:
                    return
                response = self.handle(payload)
                if response is not None:
                    sock.sendall(frame(response))
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
        logger.info("card connected to vpcd at %s:%d", self.host, self.port)
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


def _recv_exact(sock: socket.socket, size: int, quickack: int | None) -> bytes | None:
    """Read exactly ``size`` bytes; ``None`` if the peer closed the connection first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
        if quickack is not None:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
    return bytes(buf)
