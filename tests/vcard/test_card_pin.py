"""PIN and PUK: counters, blocking, unblocking, persistence, and the per-slot PIN policy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from piv_host import PIN, PUK, Host, pad_pin

from vcard.card import VirtualCard
from vcard.constants import KeyType, Slot
from vcard.softkeys import SoftKeyBackend
from vcard.tlv import Tlv

DIGEST = hashlib.sha256(b"x").digest()
WRONG = b"000000"


def sign(host: Host, slot: Slot = Slot.SIGNATURE, key_type: KeyType = KeyType.ECCP256) -> int:
    return host.gen_auth(slot, key_type, 0x81, DIGEST)[1]


def status(host: Host) -> int:
    return host.raw("00200080")[1]


def retries(host: Host, ref: int = 0x80) -> tuple[int, int]:
    total, left = Tlv.parse_dict(host.ok(0xF7, 0x00, ref))[0x06]
    return total, left


def test_wrong_pins_count_down_then_block(host: Host) -> None:
    assert status(host) == 0x63C3
    assert host.verify(WRONG) == 0x63C2
    assert status(host) == 0x63C2
    assert host.verify(WRONG) == 0x63C1
    assert retries(host) == (3, 1)
    assert host.verify(WRONG) == 0x6983
    assert host.verify(PIN) == 0x6983, "blocked: even the right PIN fails"
    assert status(host) == 0x6983
    assert retries(host) == (3, 0)


def test_right_pin_restores_the_counter(host: Host) -> None:
    assert host.verify(WRONG) == 0x63C2
    assert host.verify(PIN) == 0x9000
    assert status(host) == 0x9000
    host.card.reset()
    assert status(host) == 0x63C3


def test_wrong_pin_unverifies(host: Host) -> None:
    assert host.verify() == 0x9000
    assert host.verify(WRONG) == 0x63C2
    assert sign(host, Slot.AUTHENTICATION, KeyType.RSA2048) == 0x6982
    assert status(host) == 0x63C2


def test_puk_unblocks(host: Host) -> None:
    for _ in range(3):
        host.verify(WRONG)
    assert status(host) == 0x6983
    new = b"24681357"
    assert host.send(0x2C, 0x00, 0x80, pad_pin(PUK) + pad_pin(new))[1] == 0x9000
    assert status(host) == 0x63C3
    assert host.verify(PIN) == 0x63C2
    assert host.verify(new) == 0x9000


def test_puk_blocks_too(host: Host) -> None:
    for expected in (0x63C2, 0x63C1, 0x6983, 0x6983):
        assert host.send(0x2C, 0x00, 0x80, pad_pin(b"99999999") + pad_pin(PIN))[1] == expected
    assert retries(host, 0x81) == (3, 0)
    assert host.send(0x2C, 0x00, 0x80, pad_pin(PUK) + pad_pin(PIN))[1] == 0x6983


def test_change_pin(host: Host) -> None:
    new = b"654321"
    assert Tlv.parse_dict(host.ok(0xF7, 0x00, 0x80))[0x05] == b"\x01"
    assert host.send(0x24, 0x00, 0x80, pad_pin(PIN) + pad_pin(new))[1] == 0x9000
    assert Tlv.parse_dict(host.ok(0xF7, 0x00, 0x80))[0x05] == b"\x00"
    assert host.verify(PIN) == 0x63C2
    assert host.verify(new) == 0x9000


def test_change_pin_with_wrong_old_counts(host: Host) -> None:
    assert host.send(0x24, 0x00, 0x80, pad_pin(WRONG) + pad_pin(b"111111"))[1] == 0x63C2
    assert status(host) == 0x63C2
    # A malformed new PIN does not spend a try.
    assert host.send(0x24, 0x00, 0x80, pad_pin(WRONG) + pad_pin(b"1"))[1] == 0x6A80
    assert status(host) == 0x63C2


def test_change_puk(host: Host) -> None:
    new = b"87654321"
    assert host.send(0x24, 0x00, 0x81, pad_pin(PUK) + pad_pin(new))[1] == 0x9000
    assert host.send(0x2C, 0x00, 0x80, pad_pin(PUK) + pad_pin(PIN))[1] == 0x63C2
    assert host.send(0x2C, 0x00, 0x80, pad_pin(new) + pad_pin(PIN))[1] == 0x9000


def test_counters_and_pins_persist_across_reopen(card_dir: Path) -> None:
    host = Host(VirtualCard(SoftKeyBackend.open(card_dir)))
    assert host.verify(WRONG) == 0x63C2
    assert host.send(0x24, 0x00, 0x80, pad_pin(PIN) + pad_pin(b"13572468"))[1] == 0x9000
    assert host.verify(WRONG) == 0x63C2
    reopened = Host(VirtualCard(SoftKeyBackend.open(card_dir)))
    assert status(reopened) == 0x63C2
    assert reopened.verify(b"13572468") == 0x9000


def test_signature_slot_needs_verify_before_each_use(host: Host) -> None:
    assert sign(host) == 0x6982
    assert host.verify() == 0x9000
    assert sign(host) == 0x9000
    assert sign(host) == 0x6982, "PIN-always: one signature per VERIFY"
    assert host.verify() == 0x9000
    host.ok(0xCB, 0x3F, 0xFF, bytes.fromhex("5c017e"))
    assert sign(host) == 0x6982, "only the command right after VERIFY may use the key"
    assert host.verify() == 0x9000
    assert sign(host) == 0x9000
    # PIN-once slots still work without a new VERIFY.
    assert sign(host, Slot.AUTHENTICATION, KeyType.RSA2048) == 0x6A80  # wrong-length block
    assert sign(host, Slot.KEY_MANAGEMENT, KeyType.ECCP384) == 0x9000


def test_pin_always_survives_command_chaining(backend: SoftKeyBackend) -> None:
    """Chained parts are not commands of their own; the chain's last part uses the token."""
    host = Host(VirtualCard(backend, pin_always_slots={Slot.AUTHENTICATION}))
    block = (
        b"\x00\x01"
        + b"\xff" * 202
        + b"\x00"
        + bytes.fromhex("3031300d060960864801650304020105000420")
        + DIGEST
    )
    assert len(block) == 256
    assert host.verify() == 0x9000
    assert host.gen_auth(Slot.AUTHENTICATION, KeyType.RSA2048, 0x81, block)[1] == 0x9000
    assert host.gen_auth(Slot.AUTHENTICATION, KeyType.RSA2048, 0x81, block)[1] == 0x6982
    # 9C now follows its PIN-once default.
    assert sign(host) == 0x9000 and sign(host) == 0x9000


def test_pin_always_can_be_switched_off(backend: SoftKeyBackend) -> None:
    host = Host(VirtualCard(backend, pin_always_slots=frozenset()))
    assert sign(host) == 0x6982
    assert host.verify() == 0x9000
    assert sign(host) == 0x9000 and sign(host) == 0x9000
    metadata = Tlv.parse_dict(host.ok(0xF7, 0x00, Slot.SIGNATURE))
    assert metadata[0x02] == b"\x02\x01"  # ONCE, touch never


def test_card_auth_needs_no_pin(host: Host) -> None:
    assert sign(host, Slot.CARD_AUTH) == 0x9000
    assert sign(host, Slot.CARD_AUTH) == 0x9000


def test_pin_once_survives_reselect(host: Host) -> None:
    assert host.verify() == 0x9000
    host.ok(0xA4, 0x04, 0x00, bytes.fromhex("a000000308000010000100"))
    assert host.raw("00a4040008a00000052747111700")[1] == 0x6A82
    assert sign(host, Slot.KEY_MANAGEMENT, KeyType.ECCP384) == 0x9000
    assert status(host) == 0x9000


@pytest.mark.parametrize("event", ["reset", "power_off", "verify_ff"])
def test_volatile_state_is_cleared(host: Host, event: str) -> None:
    assert host.verify() == 0x9000
    assert host.authenticate() == 0x9000
    if event == "verify_ff":
        assert host.raw("0020ff80")[1] == 0x9000
    else:
        getattr(host.card, event)()
        host.card.power_on()
    assert sign(host, Slot.KEY_MANAGEMENT, KeyType.ECCP384) == 0x6982
    assert status(host) == 0x63C3
    put = bytes.fromhex("00db3fff085c035fc109530100")
    assert host.raw(put)[1] == (0x9000 if event == "verify_ff" else 0x6982)
