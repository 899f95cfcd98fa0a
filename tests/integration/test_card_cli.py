"""`cardbridge card run` and `cardbridge card doctor` on the real stack."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from pcsc_stack import (
    CARDBRIDGE,
    PIN,
    READER,
    VPCD,
    CardSlot,
    card_present,
    card_ready,
    make_card,
    pkcs11_sign,
    wait_for,
)

pytestmark = pytest.mark.pcsc


def doctor(*args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [CARDBRIDGE, "card", "doctor", *args], capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_doctor_with_a_card(card_slot: CardSlot, tmp_path: Path) -> None:
    card_slot.present(make_card(tmp_path / "card", "p256"))
    rc, out = doctor("--json")
    assert rc == 0, out
    checks = json.loads(out)
    assert [c["name"] for c in checks] == [
        "pcscd reachable",
        "vpcd reader listed",
        "card present",
        "card answers SELECT PIV",
        "APDU round trip",
    ]
    assert all(c["ok"] for c in checks)
    assert checks[1]["detail"] == READER
    assert "3BFB1300008131FE1580F9A0000003080000100071" in checks[2]["detail"]
    card_slot.remove()


def test_doctor_without_a_card_says_what_to_fix(card_slot: CardSlot) -> None:
    card_slot.remove()
    rc, out = doctor()
    assert rc == 1
    assert "[FAIL] card present" in out
    assert "cardbridge card run --soft DIR" in out


def test_doctor_with_an_unknown_reader_name(card_slot: CardSlot) -> None:
    rc, out = doctor("--reader", "no such reader")
    assert rc == 1
    assert "[FAIL] vpcd reader listed" in out and READER in out


def test_run_traces_apdus_without_secrets(card_slot: CardSlot, tmp_path: Path) -> None:
    card_slot.remove()
    card = make_card(tmp_path / "card", "p256")
    log = tmp_path / "trace.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [CARDBRIDGE, "card", "run", "--soft", card.path, "--vpcd", VPCD, "--trace",
             "--apdu-timeout", "2.5"],  # fmt: skip
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(card_ready, "the traced card")
        pkcs11_sign("01", "ECDSA-SHA256", Path("/etc/hostname"), tmp_path / "sig")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    wait_for(lambda: not card_present(), "the card's removal")
    text = log.read_text()
    assert "card connected to vpcd at 127.0.0.1:35963 (APDU timeout 2.5 s)" in text
    assert "TRAFFIC" in text and "00 20 00 80 08" in text  # VERIFY was traced...
    pin_hex = PIN.encode().hex(" ")
    assert pin_hex not in text.lower()  # ...without the PIN
    assert "00 87 11 9a" in text.lower()
    assert "Traceback" not in text


def test_run_errors_are_one_line(tmp_path: Path) -> None:
    not_a_card = subprocess.run(
        [CARDBRIDGE, "card", "run", "--soft", str(tmp_path)], capture_output=True, text=True
    )
    assert not_a_card.returncode == 1
    assert not_a_card.stderr.strip().splitlines() == [
        f"Error: {tmp_path} is not a cardbridge soft card (no card.json)"
    ]
    card = make_card(tmp_path / "card", "p256")
    unreachable = subprocess.run(
        [CARDBRIDGE, "card", "run", "--soft", str(card.path), "--vpcd", "127.0.0.1:9"],
        capture_output=True,
        text=True,
    )
    assert unreachable.returncode == 1
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach vpcd at 127.0.0.1:9")


def test_run_in_vpcd_second_slot(card_slot: CardSlot, tmp_path: Path) -> None:
    """--vpcd picks the reader: port 35964 is vpcd's slot 2, "cardbridge vpcd 00 01"."""
    card_slot.remove()
    card = make_card(tmp_path / "card", "p256")
    proc = subprocess.Popen(
        [CARDBRIDGE, "card", "run", "--soft", str(card.path), "--vpcd", "127.0.0.1:35964"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answers() -> bool:
            rc, _ = doctor("--reader", "cardbridge vpcd 00 01")
            return rc == 0

        wait_for(answers, "the card in the second slot")
        assert not card_present()  # nothing in slot 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
