"""Sole control: a credential enrolled with ``--otp-per-signature`` signs with 9C only after the
user approves that signature with a fresh TOTP (``cardbridge card approve``). Without approval
the card answers 6982 after the configured timeout; a TOTP step is never accepted twice.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import RemoteCard, enroll_card
from cryptography.hazmat.primitives import serialization
from live_server import LiveServer
from pcsc_stack import PKCS11, CardSlot, pkcs11, run, wait_for

pytestmark = [pytest.mark.pcsc, pytest.mark.hsm]

APPROVAL_TIMEOUT = 4


@pytest.fixture
def sole_card(
    bridge_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> Iterator[RemoteCard]:
    card = enroll_card(bridge_server, f"sole{time.monotonic_ns()}", tmp_path, alg="p256",
                       otp_per_signature=True,
                       run_extra=["--approval-timeout", str(APPROVAL_TIMEOUT)])  # fmt: skip
    card_slot.present(card)
    card.login()
    yield card
    card_slot.remove()


def start_signing(card: RemoteCard, tmp_path: Path, name: str) -> tuple[
    subprocess.Popen[bytes], Path, Path
]:
    """pkcs11-tool signs ``name`` with the 9C key, in the background."""
    data, sig = tmp_path / f"{name}.txt", tmp_path / f"{name}.sig"
    data.write_bytes(f"the document {name}".encode())
    proc = subprocess.Popen(
        ["pkcs11-tool", "--module", PKCS11, "--login", "--pin", card.pin, "--sign", "--id", "02",
         "-m", "ECDSA-SHA256", "--signature-format", "openssl", "-i", str(data),
         "-o", str(sig)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, data, sig


def waiting(card: RemoteCard) -> list[dict[str, object]]:
    pending: list[dict[str, object]] = card.status()["pending"]
    return pending


def verify(card: RemoteCard, data: Path, sig: Path, tmp_path: Path) -> None:
    pub = tmp_path / "9c.pem"
    pub.write_bytes(card.certificate("9c").public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert "Verified OK" in run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig,
                                data)  # fmt: skip


def test_without_approval_the_card_answers_6982_after_the_timeout(
    sole_card: RemoteCard, card_slot: CardSlot, tmp_path: Path
) -> None:
    began = time.monotonic()
    proc, _, _ = start_signing(sole_card, tmp_path, "unapproved")
    out = proc.communicate(timeout=60)[0].decode()
    took = time.monotonic() - began
    assert proc.returncode != 0, out
    assert APPROVAL_TIMEOUT <= took < APPROVAL_TIMEOUT + 10, took
    assert f"no approval within {APPROVAL_TIMEOUT} s" in card_slot.log()
    assert waiting(sole_card) == []


def test_approval_with_a_fresh_totp_signs_and_the_same_totp_is_refused(
    sole_card: RemoteCard, tmp_path: Path
) -> None:
    proc, data, sig = start_signing(sole_card, tmp_path, "approved")
    wait_for(lambda: bool(waiting(sole_card)), "the signature to wait for approval")
    (pending,) = waiting(sole_card)
    assert pending["slot"] == "9c"
    assert pending["digest"] == hashlib.sha256(data.read_bytes()).hexdigest()  # what is signed
    shown = sole_card.cli("card", "approve", "--otp", (code := sole_card.otp()))
    assert f"digest {pending['digest']}" in shown.stdout and "signed" in shown.stdout
    assert proc.wait(30) == 0
    verify(sole_card, data, sig, tmp_path)

    # The same TOTP again: the server accepts a time step once, so the signature is refused.
    proc, _, _ = start_signing(sole_card, tmp_path, "replayed")
    wait_for(lambda: bool(waiting(sole_card)), "the second signature to wait")
    refused = sole_card.cli("card", "approve", "--otp", code, check=False)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr == ("Error: approval failed: signature #2: the server refused it: "
                              "invalid or already used one-time password\n")  # fmt: skip
    assert proc.wait(30) != 0


def test_approve_with_nothing_waiting_and_other_slots_need_no_approval(
    sole_card: RemoteCard, tmp_path: Path
) -> None:
    out = sole_card.cli("card", "approve", "--otp", "123456", check=False)
    assert out.returncode == 1 and "no signature waits for approval" in out.stderr
    data, sig = tmp_path / "auth.txt", tmp_path / "auth.sig"
    data.write_bytes(b"9A authenticates without approval")
    pkcs11("--login", "--pin", sole_card.pin, "--sign", "--id", "01", "-m", "ECDSA-SHA256",
           "-i", data, "-o", sig, "--signature-format", "openssl")  # fmt: skip
    status = json.loads(sole_card.cli("card", "status", "--json").stdout)
    assert status["slots"]["9c"]["otp_per_signature"] is True
    assert status["slots"]["9a"]["otp_per_signature"] is False
