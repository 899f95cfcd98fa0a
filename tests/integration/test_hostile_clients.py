"""Misbehaving clients and a hanging backend, through pcscd + vpcd: whatever one program
sends, the reader keeps answering and the next program's commands are not corrupted."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hanging_card import HANG_DIGEST
from pcsc_stack import PIN, READER, VPCD, CardSlot, SoftCard, make_card, run, wait_for
from smartcard import scard

from vcard.constants import ATR, Slot
from vcard.doctor import SELECT_PIV, PcscReader
from vcard.tlv import Tlv

pytestmark = pytest.mark.pcsc

VERIFY = bytes.fromhex("0020008008") + PIN.encode().ljust(8, b"\xff")
CHAINED_SELECT_PART = bytes.fromhex("10A40400051122334455")
GET_CHUID_8 = bytes.fromhex("00CB3FFF055C035FC10208")
GET_RESPONSE = bytes.fromhex("00C0000000")


@pytest.fixture(scope="module")
def p256_card(tmp_path_factory: pytest.TempPathFactory) -> SoftCard:
    return make_card(tmp_path_factory.mktemp("hostile") / "p256", "p256")


@pytest.fixture
def card(p256_card: SoftCard, card_slot: CardSlot) -> SoftCard:
    return card_slot.present(p256_card)


def transmit_within(conn: PcscReader, apdu: bytes, seconds: float = 10.0) -> tuple[bytes, int]:
    """``conn.transmit``, failing the test if no answer comes: SCardTransmit has no timeout."""
    outcome: list[tuple[bytes, int] | BaseException] = []

    def send() -> None:
        try:
            outcome.append(conn.transmit(apdu))
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        pytest.fail(f"no answer to {apdu.hex(' ')} within {seconds} s: the reader is wedged")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def sign_request(digest: bytes) -> bytes:
    body = Tlv(0x7C, Tlv(0x82) + Tlv(0x81, digest))
    return bytes([0x00, 0x87, 0x11, Slot.AUTHENTICATION, len(body)]) + body + b"\x00"


# -- 1-byte APDUs -------------------------------------------------------------------------


@pytest.mark.parametrize("byte", [0xDB, 0x05, 0xFF], ids=["DB", "05", "FF"])
def test_one_byte_apdu_is_answered_6700(card: SoftCard, byte: int) -> None:
    """vpcd frames it as a 1-byte message; only 00/01/02/04 are its control codes."""
    with PcscReader(READER) as conn:
        assert transmit_within(conn, bytes([byte])) == (b"", 0x6700)
        assert transmit_within(conn, SELECT_PIV)[1] == 0x9000


# -- interrupted chains -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interloper", "sw"),
    [
        pytest.param("8020F446", 0x6E00, id="CLA-80"),  # refused before its header is read
        pytest.param("FFA4040009A00000030800001000", 0x6E00, id="CLA-FF"),
        pytest.param("00A4040005A0", 0x6700, id="Lc-too-long"),
        pytest.param("0CCB3FFF035C017E00", 0x6882, id="secure-messaging"),
    ],
)
def test_abandoned_chain_does_not_corrupt_the_next_program(
    card: SoftCard, interloper: str, sw: int
) -> None:
    with PcscReader(READER) as hostile:
        assert transmit_within(hostile, CHAINED_SELECT_PART) == (b"", 0x9000)
        assert transmit_within(hostile, bytes.fromhex(interloper)) == (b"", sw)
    with PcscReader(READER) as victim:
        data, sw = transmit_within(victim, SELECT_PIV)
        assert sw == 0x9000 and data[:1] == b"\x61"


def test_yubico_piv_tool_after_an_abandoned_chain(card: SoftCard) -> None:
    """ykpiv's first command is SELECT PIV, the command that the stale part used to swallow."""
    with PcscReader(READER) as hostile:
        transmit_within(hostile, CHAINED_SELECT_PART)
        transmit_within(hostile, bytes.fromhex("8020F446"))
    out = run("yubico-piv-tool", "-r", "cardbridge", "-a", "status")
    assert "CHUID:" in out


def test_pending_response_is_dropped_by_a_refused_command(card: SoftCard) -> None:
    with PcscReader(READER) as conn:
        data, sw = transmit_within(conn, GET_CHUID_8)
        assert len(data) == 8 and sw >> 8 == 0x61
        assert transmit_within(conn, bytes.fromhex("8020F446")) == (b"", 0x6E00)
        assert transmit_within(conn, GET_RESPONSE) == (b"", 0x6985)


# -- a backend that hangs -----------------------------------------------------------------

APDU_TIMEOUT = 1.0
HANG_SECONDS = 5.0


@pytest.fixture
def hanging_card(tmp_path: Path, card_slot: CardSlot) -> SoftCard:
    """A card whose backend takes HANG_SECONDS over an ECDSA signature of HANG_DIGEST."""
    card = make_card(tmp_path / "hanging", "p256")
    script = Path(__file__).with_name("hanging_card.py")
    argv = [sys.executable, script, card.path, VPCD, str(APDU_TIMEOUT), str(HANG_SECONDS)]
    return card_slot.present(card, argv)


def test_hanging_backend_is_answered_6400_and_the_reader_keeps_working(
    hanging_card: SoftCard, card_slot: CardSlot
) -> None:
    stuck_at: list[float] = []
    with PcscReader(READER) as signer, PcscReader(READER) as other:
        assert signer.transmit(SELECT_PIV)[1] == 0x9000
        assert signer.transmit(VERIFY) == (b"", 0x9000)
        start = time.monotonic()
        assert transmit_within(signer, sign_request(HANG_DIGEST)) == (b"", 0x6400)
        stuck_at.append(time.monotonic() - start)
        # While the backend is still busy, other programs get 6400 at once, the ATR is
        # served, and a reset goes through.
        start = time.monotonic()
        assert transmit_within(other, SELECT_PIV) == (b"", 0x6400)
        assert time.monotonic() - start < APDU_TIMEOUT / 2
        assert other.atr == ATR
        other.close(scard.SCARD_RESET_CARD)
    with PcscReader(READER) as again:
        assert transmit_within(again, SELECT_PIV) == (b"", 0x6400)
    assert APDU_TIMEOUT * 0.9 <= stuck_at[0] < HANG_SECONDS - 1

    # Once the backend returns, its late answer is dropped and the card was reset: the PIN
    # must be verified again, then signing works.
    def answers() -> bool:
        with PcscReader(READER) as conn:
            return conn.transmit(SELECT_PIV)[1] == 0x9000

    wait_for(answers, "the card to come back", timeout=HANG_SECONDS + 5)
    digest = hashlib.sha256(b"after the hang").digest()
    with PcscReader(READER) as conn:
        assert conn.transmit(SELECT_PIV)[1] == 0x9000
        assert transmit_within(conn, sign_request(digest)) == (b"", 0x6982)
        assert conn.transmit(VERIFY) == (b"", 0x9000)
        data, sw = transmit_within(conn, sign_request(digest))
    assert sw == 0x9000
    signature = Tlv.unpack(0x82, Tlv.unpack(0x7C, data))
    public_key = hanging_card.certs[Slot.AUTHENTICATION].public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    log = card_slot.log()
    assert "did not answer APDU 00 87 11 9a" in log
    assert "late response (SW 9000) dropped" in log
    assert "Traceback" not in log

