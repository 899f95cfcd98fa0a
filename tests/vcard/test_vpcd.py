"""The vpcd link against a local fake vpcd: framing, control codes, reconnects, latency."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from vcard.vpcd import VpcdLink, VpcdUnreachable, frame, parse_address

ATR = bytes.fromhex("3BFB1300008131FE158059A000000308000010000071")


class FakeCard:
    """Records what the link asks of it; answers APDUs with their INS echoed and 9000."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.apdus: list[bytes] = []

    @property
    def atr(self) -> bytes:
        return ATR

    def transmit(self, apdu: bytes) -> bytes:
        self.apdus.append(apdu)
        return apdu[1:2] + b"\x90\x00"

    def power_on(self) -> None:
        self.events.append("on")

    def power_off(self) -> None:
        self.events.append("off")

    def reset(self) -> None:
        self.events.append("reset")


class FakeVpcd:
    """A listening socket playing vpcd: it accepts the card and exchanges frames."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.server.settimeout(5)
        conn, _ = self.server.accept()
        conn.settimeout(5)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        return conn

    def send(self, payload: bytes, *, split: bool = True) -> None:
        """Send like vpcd does: the length and the body as two writes."""
        assert self.conn is not None
        if split:
            self.conn.sendall(struct.pack(">H", len(payload)))
            self.conn.sendall(payload)
        else:
            self.conn.sendall(frame(payload))

    def recv(self) -> bytes:
        assert self.conn is not None
        header = _read(self.conn, 2)
        return _read(self.conn, struct.unpack(">H", header)[0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def _read(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        assert chunk, "link closed the connection"
        buf += chunk
    return buf


@pytest.fixture
def vpcd() -> Iterator[FakeVpcd]:
    fake = FakeVpcd()
    yield fake
    fake.close()


@pytest.fixture
def card() -> FakeCard:
    return FakeCard()


@pytest.fixture
def link(vpcd: FakeVpcd, card: FakeCard) -> Iterator[VpcdLink]:
    link = VpcdLink(card, "127.0.0.1", vpcd.port)
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    vpcd.accept()
    assert link.connected.wait(5)
    yield link
    link.stop()
    thread.join(5)
    assert not thread.is_alive(), "the link did not stop"


def test_frame_prefixes_big_endian_length() -> None:
    assert frame(b"") == b"\x00\x00"
    assert frame(b"\x90\x00") == b"\x00\x02\x90\x00"
    assert frame(bytes(0x1234))[:2] == b"\x12\x34"
    with pytest.raises(ValueError):
        frame(bytes(0x10000))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:35963", ("127.0.0.1", 35963)),
        ("localhost:35964", ("localhost", 35964)),
        ("35964", ("127.0.0.1", 35964)),
        ("[::1]:40000", ("::1", 40000)),
        (":1", ("127.0.0.1", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:", "host:port", "host:0", "host:65536", ""])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_only_atr_request_is_answered(vpcd: FakeVpcd, card: FakeCard, link: VpcdLink) -> None:
    for code in (b"\x01", b"\x02", b"\x00", b"\x01"):
        vpcd.send(code)
    vpcd.send(b"\x04")
    # Had the link answered a power control, this frame would not be the ATR.
    assert vpcd.recv() == ATR
    assert card.events == ["on", "reset", "off", "on"]


def test_unknown_control_code_is_ignored(vpcd: FakeVpcd, card: FakeCard, link: VpcdLink) -> None:
    vpcd.send(b"\x07")
    vpcd.send(b"\x04")
    assert vpcd.recv() == ATR
    assert card.events == []


def test_apdus_are_answered_in_order(vpcd: FakeVpcd, card: FakeCard, link: VpcdLink) -> None:
    apdus = [bytes.fromhex("00A4040005A000000308"), bytes.fromhex("00CB3FFF055C035FC102")]
    for apdu in apdus:
        vpcd.send(apdu)
    assert [vpcd.recv(), vpcd.recv()] == [b"\xa4\x90\x00", b"\xcb\x90\x00"]
    assert card.apdus == apdus


def test_large_and_byte_by_byte_frames(vpcd: FakeVpcd, card: FakeCard, link: VpcdLink) -> None:
    big = b"\x00\xdb\x3f\xff\x00" + bytes(range(256)) * 200
    vpcd.send(big, split=False)
    assert vpcd.recv() == b"\xdb\x90\x00"
    assert vpcd.conn is not None
    for byte in frame(bytes.fromhex("0020008000")):
        vpcd.conn.sendall(bytes([byte]))
        time.sleep(0.001)
    assert vpcd.recv() == b"\x20\x90\x00"
    assert card.apdus == [big, bytes.fromhex("0020008000")]


def test_one_write_per_frame_and_no_nagle_delay(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink
) -> None:
    # With Nagle plus delayed ACK a round trip costs ~40 ms; without, well under 2 ms.
    apdu = bytes.fromhex("00CB3FFF055C037E0000")
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        vpcd.send(apdu)
        vpcd.recv()
        timings.append(time.perf_counter() - start)
    timings.sort()
    assert timings[len(timings) // 2] < 0.005, f"median round trip {timings[100] * 1e3:.1f} ms"


def test_connection_sets_nodelay(vpcd: FakeVpcd, card: FakeCard) -> None:
    sock = VpcdLink(card, "127.0.0.1", vpcd.port).connect()
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()


def test_unreachable_vpcd_raises_one_clear_error(card: FakeCard) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(VpcdUnreachable, match=rf"127\.0\.0\.1:{port}.*pcscd"):
        VpcdLink(card, "127.0.0.1", port).run()


def test_reconnects_after_vpcd_restarts(vpcd: FakeVpcd, card: FakeCard, link: VpcdLink) -> None:
    vpcd.send(b"\x01")
    vpcd.send(b"\x04")
    assert vpcd.recv() == ATR
    assert vpcd.conn is not None
    vpcd.conn.close()  # pcscd went away
    vpcd.accept()  # ...and came back on the same port
    assert link.connected.wait(5)
    vpcd.send(b"\x04")
    assert vpcd.recv() == ATR
    # The drop powered the card off, so no PIN state survives into the new connection.
    assert card.events == ["on", "off"]


def test_stop_ends_run_and_powers_off(vpcd: FakeVpcd, card: FakeCard) -> None:
    link = VpcdLink(card, "127.0.0.1", vpcd.port)
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    conn = vpcd.accept()
    assert link.connected.wait(5)
    link.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert conn.recv(1) == b""  # vpcd sees the card go away
    assert card.events == ["off"]
