"""The vpcd link against a local fake vpcd: framing, control codes, reconnects, latency, and
the watchdog that answers 6400 for a card call that overruns the APDU timeout."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcard.card import VirtualCard
from vcard.constants import Slot
from vcard.softkeys import SoftKeyBackend
from vcard.tlv import Tlv
from vcard.vpcd import VpcdLink, VpcdUnreachable, frame, parse_address

ATR = bytes.fromhex("3BFB1300008131FE158059A000000308000010000071")
SW_6400 = b"\x64\x00"
#: The fake card's APDUs with this INS (and its power calls named in ``slow``) hang until
#: the test sets ``release``, like a backend whose server does not answer.
SLOW_INS = 0xEE
SLOW_APDU = bytes([0x00, SLOW_INS, 0x00, 0x00])
GET_DATA = bytes.fromhex("00CB3FFF")
TIMEOUT = 0.3


class FakeCard:
    """Records what the link asks of it; answers APDUs with their INS echoed and 9000."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.apdus: list[bytes] = []
        self.slow: set[str] = set()
        self.release = threading.Event()
        self.busy = threading.Event()  # set while a slow call is hanging

    @property
    def atr(self) -> bytes:
        return ATR

    def _hang(self) -> None:
        self.busy.set()
        assert self.release.wait(10), "the test never released the card"
        self.busy.clear()

    def transmit(self, apdu: bytes) -> bytes:
        self.apdus.append(apdu)
        if apdu[1:2] == bytes([SLOW_INS]):
            self._hang()
        return apdu[1:2] + b"\x90\x00"

    def power_on(self) -> None:
        self.events.append("on")

    def power_off(self) -> None:
        self.events.append("off")

    def reset(self) -> None:
        self.events.append("reset")
        if "reset" in self.slow:
            self._hang()


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
    link = VpcdLink(card, "127.0.0.1", vpcd.port, apdu_timeout=TIMEOUT)
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    vpcd.accept()
    assert link.connected.wait(5)
    yield link
    link.stop()
    card.release.set()
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


def test_other_one_byte_frames_are_apdus(vpcd: FakeVpcd, card: FakeCard, link: VpcdLink) -> None:
    """vpcd only sends 00, 01, 02 and 04: any other 1-byte frame is a client's APDU."""
    vpcd.send(b"\xdb")
    assert vpcd.recv() == b"\x90\x00"
    assert card.apdus == [b"\xdb"] and card.events == []


def test_one_byte_apdu_gets_6700_from_the_card(vpcd: FakeVpcd, backend: SoftKeyBackend) -> None:
    link = VpcdLink(VirtualCard(backend), "127.0.0.1", vpcd.port)
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    vpcd.accept()
    try:
        for byte in (0x03, 0x05, 0xDB, 0xFF):
            vpcd.send(bytes([byte]))
            assert vpcd.recv() == b"\x67\x00"
        vpcd.send(b"\x04")
        assert vpcd.recv() == VirtualCard.atr
    finally:
        link.stop()
        thread.join(5)


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


# -- the APDU timeout ----------------------------------------------------------------------


def _timed_recv(vpcd: FakeVpcd) -> tuple[bytes, float]:
    start = time.monotonic()
    return vpcd.recv(), time.monotonic() - start


def _card_back(vpcd: FakeVpcd, apdu: bytes = GET_DATA) -> bytes:
    """Send ``apdu`` until the card itself answers (until then the link answers 6400)."""
    for _ in range(100):
        vpcd.send(apdu)
        answer = vpcd.recv()
        if answer != SW_6400:
            return answer
        time.sleep(0.01)
    pytest.fail("the link never handed the connection back to the card")


def test_apdu_timeout_must_be_positive(card: FakeCard) -> None:
    with pytest.raises(ValueError, match="positive"):
        VpcdLink(card, apdu_timeout=0)


def test_overrun_is_answered_6400_at_the_deadline(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink
) -> None:
    vpcd.send(SLOW_APDU)
    answer, elapsed = _timed_recv(vpcd)
    assert answer == SW_6400
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.0
    assert card.busy.is_set()  # the card is still inside transmit


def test_while_stuck_the_link_answers_for_the_card(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink
) -> None:
    vpcd.send(SLOW_APDU)
    assert vpcd.recv() == SW_6400
    # Every APDU gets 6400 at once, without reaching the card, whose transmit is still busy.
    for apdu in (bytes.fromhex("00A4040005A000000308"), b"\xdb"):
        vpcd.send(apdu)
        answer, elapsed = _timed_recv(vpcd)
        assert answer == SW_6400 and elapsed < TIMEOUT
    vpcd.send(b"\x04")
    assert vpcd.recv() == ATR
    for code in (b"\x00", b"\x01"):
        vpcd.send(code)
    vpcd.send(b"\x04")
    assert vpcd.recv() == ATR
    assert card.events == [] and card.apdus == [SLOW_APDU]
    card.release.set()
    # The late "EE 90 00" is dropped: the first answer from the card itself is the next
    # APDU's, on a card that was reset and then saw the queued power controls, in order.
    assert _card_back(vpcd) == b"\xcb\x90\x00"
    assert card.events == ["reset", "off", "on"]
    assert card.apdus == [SLOW_APDU, GET_DATA]


def test_late_response_is_logged(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink, caplog: pytest.LogCaptureFixture
) -> None:
    vpcd.send(SLOW_APDU)
    assert vpcd.recv() == SW_6400
    card.release.set()
    assert _card_back(vpcd) == b"\xcb\x90\x00"
    messages = [r.getMessage() for r in caplog.records if r.name == "vcard.vpcd"]
    assert any("did not answer APDU 00 ee 00 00 within 0.3 s" in m for m in messages), messages
    assert any("late response (SW 9000) dropped" in m for m in messages), messages


def test_a_hanging_power_control_is_bounded_too(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink
) -> None:
    """A reset reaches the backend (``KeyBackend.power_cycle``), which may hang as well."""
    card.slow.add("reset")
    vpcd.send(b"\x02")
    time.sleep(TIMEOUT * 1.5)
    vpcd.send(b"\x04")
    answer, elapsed = _timed_recv(vpcd)
    assert answer == ATR and elapsed < TIMEOUT
    vpcd.send(GET_DATA)
    assert vpcd.recv() == SW_6400
    card.release.set()
    assert _card_back(vpcd) == b"\xcb\x90\x00"
    # No reset after a power control that overran: it had no answer to drop.
    assert card.events == ["reset"]


def test_vpcd_leaving_while_the_card_is_stuck(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink
) -> None:
    vpcd.send(SLOW_APDU)
    assert vpcd.recv() == SW_6400
    assert vpcd.conn is not None
    vpcd.conn.close()  # pcscd went away while the card was busy
    card.release.set()
    vpcd.accept()  # the link reconnects once the card is back
    assert link.connected.wait(5)
    vpcd.send(GET_DATA)
    assert vpcd.recv() == b"\xcb\x90\x00"
    assert card.events == ["off"]


def test_stop_while_the_card_is_stuck(vpcd: FakeVpcd, card: FakeCard) -> None:
    link = VpcdLink(card, "127.0.0.1", vpcd.port, apdu_timeout=TIMEOUT)
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    vpcd.accept()
    vpcd.send(SLOW_APDU)
    assert vpcd.recv() == SW_6400
    link.stop()
    card.release.set()
    thread.join(5)
    assert not thread.is_alive()
    assert card.events == ["off"]


def test_one_watchdog_thread_and_no_thread_per_apdu(
    vpcd: FakeVpcd, card: FakeCard, link: VpcdLink
) -> None:
    before = threading.enumerate()
    for _ in range(100):
        vpcd.send(GET_DATA)
        vpcd.recv()
    assert threading.enumerate() == before
    assert [t.name for t in before].count("vpcd-watchdog") == 1


class GatedBackend(SoftKeyBackend):
    """A soft backend whose ECDSA waits for ``gate``, like a server that does not answer."""

    gate: threading.Event

    def ecdsa_sign(self, slot: Slot, digest: bytes) -> bytes:
        assert self.gate.wait(10), "the test never opened the gate"
        return super().ecdsa_sign(slot, digest)


def test_a_hanging_backend_behind_the_real_card(vpcd: FakeVpcd, card_dir: Path) -> None:
    """VirtualCard over a backend that hangs: 6400 at the deadline; afterwards the card was
    reset (its PIN must be verified again) and signs normally."""
    backend = GatedBackend.open(card_dir)
    assert isinstance(backend, GatedBackend)
    backend.gate = threading.Event()
    link = VpcdLink(VirtualCard(backend), "127.0.0.1", vpcd.port, apdu_timeout=TIMEOUT)
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    vpcd.accept()
    verify = bytes.fromhex("0020008008313233343536FFFF")
    body = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, bytes(range(48))))
    sign = bytes([0x00, 0x87, 0x14, Slot.KEY_MANAGEMENT, len(body)]) + body + b"\x00"
    try:
        vpcd.send(verify)
        assert vpcd.recv() == b"\x90\x00"
        vpcd.send(sign)
        answer, elapsed = _timed_recv(vpcd)
        assert answer == SW_6400 and TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.0
        backend.gate.set()
        assert _card_back(vpcd, sign) == b"\x69\x82"  # the reset forgot the PIN
        vpcd.send(verify)
        assert vpcd.recv() == b"\x90\x00"
        vpcd.send(sign)
        signed = vpcd.recv()
        assert signed[-2:] == b"\x90\x00"
        assert Tlv.unpack(0x82, Tlv.unpack(0x7C, signed[:-2]))[0] == 0x30  # DER ECDSA
    finally:
        backend.gate.set()
        link.stop()
        thread.join(5)
