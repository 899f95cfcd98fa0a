"""Raw APDUs through pcscd + vpcd with pyscard: chaining, GET RESPONSE, Le, status words.

See piv-card-edge.md §2 (APDU layer) and §7 (status words).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pcsc_stack import READER, CardSlot, SoftCard, make_card
from smartcard import scard

from vcard.constants import Slot
from vcard.doctor import PcscReader
from vcard.tlv import Tlv

pytestmark = pytest.mark.pcsc

PIV_AID = bytes.fromhex("A000000308000010000100")


@pytest.fixture(scope="module")
def p256_card(tmp_path_factory: pytest.TempPathFactory) -> SoftCard:
    return make_card(tmp_path_factory.mktemp("conformance") / "p256", "p256")


@pytest.fixture
def conn(p256_card: SoftCard, card_slot: CardSlot) -> Iterator[PcscReader]:
    card_slot.present(p256_card)
    with PcscReader(READER) as reader:
        data, sw = reader.transmit(b"\x00\xa4\x04\x00\x09" + PIV_AID[:9] + b"\x00")
        assert sw == 0x9000, f"SELECT PIV: {sw:04X}"
        yield reader


def apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    out = bytes([cla, ins, p1, p2])
    if data:
        out += bytes([len(data)]) + data
    if le is not None:
        out += bytes([le & 0xFF])
    return out


def get_data(tag: bytes, le: int | None = 0) -> bytes:
    return apdu(0x00, 0xCB, 0x3F, 0xFF, b"\x5c" + bytes([len(tag)]) + tag, le)


def read_all(conn: PcscReader, command: bytes) -> tuple[bytes, int]:
    """Send ``command`` and follow 61xx with GET RESPONSE, as a client does."""
    data, sw = conn.transmit(command)
    while sw >> 8 == 0x61:
        more, sw = conn.transmit(apdu(0x00, 0xC0, 0x00, 0x00, le=sw & 0xFF))
        data += more
    return data, sw


@pytest.mark.parametrize("size", [5, 9, 11])
def test_select_accepts_aid_prefixes(conn: PcscReader, size: int) -> None:
    data, sw = read_all(conn, apdu(0x00, 0xA4, 0x04, 0x00, PIV_AID[:size], 0))
    assert sw == 0x9000
    apt = Tlv(data)
    assert apt.tag == 0x61
    inner = {t.tag: t.value for t in Tlv.parse_list(apt.value)}
    assert inner[0x4F] == PIV_AID
    assert inner[0x79] == bytes.fromhex("4F05A000000308")


@pytest.mark.parametrize(
    "aid",
    [
        "A000000527471117",  # Yubico management
        "A0000003974254465900",  # Windows GIDS
        "A00000000101",  # MuscleCard, probed by OpenSC first
        "A000000308000010000200",  # not a prefix of the PIV AID
    ],
)
def test_foreign_select_is_refused_and_piv_stays_selected(conn: PcscReader, aid: str) -> None:
    _, sw = conn.transmit(apdu(0x00, 0xA4, 0x04, 0x00, bytes.fromhex(aid), 0))
    assert sw == 0x6A82
    data, sw = read_all(conn, get_data(b"\x7e"))
    assert sw == 0x9000 and data[0] == 0x7E


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("00CADF3005", 0x6D00),  # setcos probe: GET DATA with INS CA
        ("00B0000000", 0x6D00),  # READ BINARY
        ("0084000008", 0x6D00),  # GET CHALLENGE
        ("0050000000", 0x6D00),
        ("80CB3FFF035C017E00", 0x6E00),  # proprietary CLA
        ("0CCB3FFF035C017E00", 0x6882),  # secure messaging bits
        ("01CB3FFF035C017E00", 0x6881),  # logical channel 1
        ("00C0000000", 0x6985),  # GET RESPONSE with nothing pending
        ("0020008004313233", 0x6700),  # Lc longer than the data
        ("00CB3FFE035C017E00", 0x6A86),  # GET DATA P1P2 != 3FFF
        ("00CB3FFF035D017E00", 0x6A80),  # GET DATA without tag list 5C
        ("00CB3FFF055C035FC10D00", 0x6A82),  # retired cert 1: absent
        ("00CB3FFF055C035FC10300", 0x6982),  # fingerprints: PIN-protected
        ("002000810431323334", 0x6A88),  # VERIFY of an unknown reference
        ("002000800431323334", 0x6A80),  # VERIFY with a PIN not padded to 8
        ("0020018008313233343536FFFF", 0x6A86),  # VERIFY P1 not 00/FF
        ("0087119A0A7C08820081043132333400", 0x6982),  # sign with 9A before VERIFY
        ("0087119F0A7C08820081043132333400", 0x6A86),  # no such key reference
        ("0047009A05AC03800111", 0x6982),  # GENERATE without 9B auth
    ],
)
def test_status_words(conn: PcscReader, command: str, expected: int) -> None:
    data, sw = conn.transmit(bytes.fromhex(command))
    assert sw == expected, f"{command}: {sw:04X}"
    assert data == b""


def test_empty_verify_reports_tries(conn: PcscReader) -> None:
    _, sw = conn.transmit(bytes.fromhex("0020008000"))
    assert sw == 0x63C3
    _, sw = conn.transmit(bytes.fromhex("0020008008313233343536FFFF"))
    assert sw == 0x9000
    _, sw = conn.transmit(bytes.fromhex("0020008000"))
    assert sw == 0x9000
    _, sw = conn.transmit(bytes.fromhex("0020FF80"))
    assert sw == 0x9000  # P1=FF: forget the verification
    _, sw = conn.transmit(bytes.fromhex("0020008000"))
    assert sw == 0x63C3


def test_eight_byte_probe_then_full_read(conn: PcscReader, p256_card: SoftCard) -> None:
    tag = Slot.AUTHENTICATION.object_id.encoded_tag
    head, sw = conn.transmit(get_data(tag, 8))
    assert len(head) == 8 and sw >> 8 == 0x61
    # OpenSC drops the pending data and re-reads; the card must answer the re-issue.
    data, sw = conn.transmit(get_data(tag, 0))
    assert len(data) == 256 and sw >> 8 == 0x61
    rest, sw = read_all(conn, apdu(0x00, 0xC0, 0x00, 0x00, le=sw & 0xFF))
    assert sw == 0x9000
    whole = data + rest
    assert whole[:8] == head
    obj = Tlv(whole)
    assert obj.tag == 0x53
    cert_tlv = Tlv.parse_list(obj.value)[0]
    assert cert_tlv.tag == 0x70
    assert x509.load_der_x509_certificate(cert_tlv.value) == p256_card.certs[Slot.AUTHENTICATION]


def test_any_other_command_drops_pending_response(conn: PcscReader) -> None:
    tag = Slot.SIGNATURE.object_id.encoded_tag
    _, sw = conn.transmit(get_data(tag, 8))
    assert sw >> 8 == 0x61
    _, sw = conn.transmit(get_data(b"\x7e"))
    assert sw == 0x9000
    _, sw = conn.transmit(apdu(0x00, 0xC0, 0x00, 0x00, le=0))
    assert sw == 0x6985


@pytest.mark.parametrize("le", [1, 16, 100, 255])
def test_never_more_than_le(conn: PcscReader, le: int) -> None:
    tag = Slot.CARD_AUTH.object_id.encoded_tag
    data, sw = conn.transmit(get_data(tag, le))
    assert len(data) == le
    assert sw >> 8 == 0x61
    more, sw = conn.transmit(apdu(0x00, 0xC0, 0x00, 0x00, le=le))
    assert len(more) <= le


def test_case_3_get_data_still_returns_data(conn: PcscReader) -> None:
    """ykpiv sends GET DATA without Le; the card answers anyway (61xx or data)."""
    data, sw = read_all(conn, get_data(b"\x7e", None))
    assert sw == 0x9000 and data[0] == 0x7E


def test_extended_get_data_returns_the_whole_object(conn: PcscReader) -> None:
    tag = Slot.AUTHENTICATION.object_id.encoded_tag
    body = b"\x5c\x03" + tag
    data, sw = conn.transmit(b"\x00\xcb\x3f\xff\x00\x00" + bytes([len(body)]) + body + b"\x00\x00")
    assert sw == 0x9000
    assert Tlv(data).tag == 0x53


def _ecdsa_9e(digest: bytes) -> bytes:
    return Tlv(0x7C, Tlv(0x82, b"") + Tlv(0x81, digest))


def test_chained_general_authenticate(conn: PcscReader, p256_card: SoftCard) -> None:
    """9E (PIN never) signs a digest sent in two chained parts; the DER signature verifies."""
    digest_hasher = hashes.Hash(hashes.SHA256())
    digest_hasher.update(b"chained")
    digest = digest_hasher.finalize()
    body = _ecdsa_9e(digest)
    first, second = body[:20], body[20:]
    data, sw = conn.transmit(apdu(0x10, 0x87, 0x11, 0x9E, first))
    assert (data, sw) == (b"", 0x9000)
    data, sw = read_all(conn, apdu(0x00, 0x87, 0x11, 0x9E, second, 0))
    assert sw == 0x9000
    outer = Tlv(data)
    assert outer.tag == 0x7C
    response = Tlv.parse_list(outer.value)[0]
    assert response.tag == 0x82
    public_key = p256_card.certs[Slot.CARD_AUTH].public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(response.value, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_interrupted_chain_is_discarded(conn: PcscReader) -> None:
    body = _ecdsa_9e(bytes(32))
    _, sw = conn.transmit(apdu(0x10, 0x87, 0x11, 0x9E, body[:20]))
    assert sw == 0x9000
    _, sw = conn.transmit(get_data(b"\x7e"))
    assert sw == 0x9000
    # The tail alone is no valid template: the first part must have been dropped.
    _, sw = conn.transmit(apdu(0x00, 0x87, 0x11, 0x9E, body[20:], 0))
    assert sw != 0x9000 and sw >> 8 != 0x61


def test_ecdh_through_raw_apdus(conn: PcscReader, p256_card: SoftCard) -> None:
    _, sw = conn.transmit(bytes.fromhex("0020008008313233343536FFFF"))
    assert sw == 0x9000
    card_pub = p256_card.certs[Slot.KEY_MANAGEMENT].public_key()
    assert isinstance(card_pub, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP256R1())
    point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    body = Tlv(0x7C, Tlv(0x82, b"") + Tlv(0x85, point))
    data, sw = read_all(conn, apdu(0x00, 0x87, 0x11, 0x9D, body, 0))
    assert sw == 0x9000
    secret = Tlv.parse_list(Tlv(data).value)[0]
    assert secret.tag == 0x82
    assert secret.value == peer.exchange(ec.ECDH(), card_pub)


def test_power_cycle_clears_the_pin(conn: PcscReader, card_slot: CardSlot) -> None:
    """A reset from the host (SCARD_RESET_CARD) reaches the card as vpcd's 02: PIN gone."""
    _, sw = conn.transmit(bytes.fromhex("0020008008313233343536FFFF"))
    assert sw == 0x9000
    conn.close(scard.SCARD_RESET_CARD)
    with PcscReader(READER) as fresh:
        # PIV is selected after power-up: no SELECT before the status query.
        _, sw = fresh.transmit(bytes.fromhex("0020008000"))
        assert sw == 0x63C3


def test_ed25519_card_signs_a_chained_message(card_slot: CardSlot, tmp_path: Path) -> None:
    """Yubico's E0: 9E signs the whole message, sent in chained parts; the cert's key verifies.

    No OpenSC before 0.27 knows Ed25519, so this card is proven with raw APDUs.
    """
    card = card_slot.present(make_card(tmp_path / "ed25519", "ed25519"))
    message = bytes(range(256)) * 2  # longer than one short APDU
    body = Tlv(0x7C, Tlv(0x82, b"") + Tlv(0x81, message))
    parts = [body[i : i + 255] for i in range(0, len(body), 255)]
    with PcscReader(READER) as conn:
        for part in parts[:-1]:
            assert conn.transmit(apdu(0x10, 0x87, 0xE0, 0x9E, part)) == (b"", 0x9000)
        data, sw = read_all(conn, apdu(0x00, 0x87, 0xE0, 0x9E, parts[-1], 0))
    assert sw == 0x9000
    signature = Tlv.parse_list(Tlv(data).value)[0]
    assert signature.tag == 0x82 and len(signature.value) == 64
    public_key = card.certs[Slot.CARD_AUTH].public_key()
    assert isinstance(public_key, ed25519.Ed25519PublicKey)
    public_key.verify(signature.value, message)
    card_slot.remove()
