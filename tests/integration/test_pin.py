"""PIN retries, blocking, PUK unblock and PIN change through OpenSC on the real reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from pcsc_stack import PIN, PUK, READER, SoftCard, pkcs11, run

from vcard.doctor import SELECT_PIV, PcscReader

pytestmark = pytest.mark.pcsc


def pin_status_word() -> int:
    """The empty VERIFY (SP 800-73-4 Part 2 §3.2.1): 63Cx tries left, 6983 blocked."""
    with PcscReader(READER) as conn:
        conn.transmit(SELECT_PIV)
        _, sw = conn.transmit(bytes.fromhex("0020008000"))
        return sw


def login_fails(pin: str) -> str:
    return pkcs11("--login", "--pin", pin, "--list-objects", ok=False)


def test_wrong_pins_count_down_then_block_and_puk_unblocks(fresh_card: SoftCard) -> None:
    assert pin_status_word() == 0x63C3
    assert "CKR_PIN_INCORRECT" in login_fails("000000")
    assert pin_status_word() == 0x63C2
    assert "CKR_PIN_INCORRECT" in login_fails("000001")
    assert pin_status_word() == 0x63C1
    out = login_fails("000002")
    assert "CKR_PIN_INCORRECT" in out or "CKR_PIN_LOCKED" in out
    assert pin_status_word() == 0x6983
    # Blocked: even the right PIN is refused now, and no counter moves.
    assert "CKR_PIN_LOCKED" in login_fails(PIN)
    assert pin_status_word() == 0x6983

    # OpenSC 0.23's pkcs11-tool --unlock-pin sends CHANGE REFERENCE DATA for the PIN (which
    # a blocked PIN refuses, 6983); its pkcs15-tool sends RESET RETRY COUNTER.
    run("pkcs15-tool", "--unblock-pin", "--puk", PUK, "--new-pin", "654321")
    assert pin_status_word() == 0x63C3
    pkcs11("--login", "--pin", "654321", "--list-objects")
    assert "CKR_PIN_INCORRECT" in login_fails(PIN)


def test_yubico_piv_tool_unblocks_and_a_wrong_puk_counts(fresh_card: SoftCard) -> None:
    ykpiv = ("yubico-piv-tool", "-r", "cardbridge")
    for _ in range(3):
        login_fails("999999")
    assert pin_status_word() == 0x6983
    out = run(*ykpiv, "-a", "unblock-pin", "-P", "87654321", "-N", "654321", ok=False)
    assert "2 tries left" in out, out
    run(*ykpiv, "-a", "unblock-pin", "-P", PUK, "-N", "654321")
    assert pin_status_word() == 0x63C3
    pkcs11("--login", "--pin", "654321", "--list-objects")


def test_change_pin(fresh_card: SoftCard, tmp_path: Path) -> None:
    pkcs11("--login", "--pin", PIN, "--change-pin", "--new-pin", "24681357")
    assert "CKR_PIN_INCORRECT" in login_fails(PIN)
    out = pkcs11("--login", "--pin", "24681357", "--list-objects")
    assert "Private Key Object" in out
    # The card itself enforces the PIV PIN form (6-8 digits); OpenSC refuses short ones too.
    out = pkcs11("--login", "--pin", "24681357", "--change-pin", "--new-pin", "12", ok=False)
    assert "CKR_PIN_LEN_RANGE" in out or "CKR_PIN_INVALID" in out
