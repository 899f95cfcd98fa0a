# SPDX-License-Identifier: Apache-2.0
"""``cardbridge sign`` with a running card (pcscd + vpcd): the card makes the CSC requests in
its own session, so the command needs no password and opens no session; the card makes only
the requests signing needs; once the card is logged out the command logs in itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bridge import RemoteCard, enroll_card
from cryptography import x509
from live_server import LiveServer
from pcsc_stack import CardSlot

from relay import control
from relay.demo import sample_pdf, validate_pdf

pytestmark = [pytest.mark.pcsc, pytest.mark.hsm]


def logins(server: LiveServer, name: str) -> list[dict[str, Any]]:
    return [r for r in server.audit() if r["event"] == "login.ok" and r["actor"] == f"user:{name}"]


def test_sign_uses_the_running_cards_session(
    bridge_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> None:
    card: RemoteCard = enroll_card(bridge_server, "signer-sam", tmp_path / "sam", alg="p256")
    card_slot.present(card)
    card.login()
    ca = x509.load_pem_x509_certificate((bridge_server.data / "ca.pem").read_bytes())
    source = tmp_path / "memo.pdf"
    source.write_bytes(sample_pdf("a memo"))
    before = logins(bridge_server, card.user)

    report = card.sign("--format", "pades", "--level", "B-T", str(source))
    assert report["session"] == "card"
    (result,) = report["results"]
    verdict = validate_pdf(Path(result["output"]).read_bytes(), ca)
    assert verdict.valid and verdict.timestamp and verdict.signer == "CN=signer-sam"
    assert logins(bridge_server, card.user) == before  # no session but the card's

    # The card makes the CSC requests of signing, nothing else in its session.
    socket = card.runtime / "control.sock"
    with pytest.raises(control.ControlError, match="does not make the CSC request 'auth/revoke'"):
        control.request(socket, "csc", method="auth/revoke", body={"token": "x"})
    with pytest.raises(control.ControlError, match="body is a JSON object"):
        control.request(socket, "csc", method="credentials/info", body=["x"])

    # Logged out, the card has no session to lend: the command logs in itself.
    card.cli("card", "logout")
    report = card.sign("--format", "cades", str(source))
    assert report["session"] == "login" and report["results"][0]["ok"]
    assert len(logins(bridge_server, card.user)) == len(before) + 1
    card_slot.remove()
