"""The bridge when things go wrong: the server killed mid-loop and back, fail-over to a second
server and back, a server that accepts connections and never answers, a revoked user, a server
that is down. The card answers a documented status word promptly, says why in its log, keeps
running, and the audit log reconciles with what the client received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from bridge import RemoteCard, enroll_card
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from live_server import LiveServer, init_data_dir, start_server
from pcsc_stack import PKCS11, CardSlot
from pcsc_stack import pkcs11 as pkcs11_tool
from pkcs11 import Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error

pytestmark = [pytest.mark.pcsc, pytest.mark.hsm, pytest.mark.slow]

PROMPT = 5.0
"""Seconds within which a failed key operation must be answered (connect timeout + margin)."""


@contextmanager
def signing(card: RemoteCard) -> Iterator[Any]:
    """A PKCS#11 session on the card through OpenSC, PIN verified once, and its 9A key."""
    lib = pkcs11.lib(PKCS11)
    token = next(iter(lib.get_slots(token_present=True))).get_token()
    session = token.open(user_pin=card.pin)
    try:
        yield session.get_key(ObjectClass.PRIVATE_KEY, id=b"\x01")
    finally:
        # OpenSC logs out on close, which fails once the card refused the session (6982).
        with suppress(PKCS11Error):
            session.close()


def sign_once(key: Any, card: RemoteCard, message: bytes) -> bytes:
    """ECDSA-SHA256 through the card; the signature is checked against the 9A certificate;
    returns the digest that was signed."""
    raw = key.sign(message, mechanism=Mechanism.ECDSA_SHA256)
    public = card.certificate("9a").public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    half = len(raw) // 2
    der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    return hashlib.sha256(message).digest()


def signed_digests(server: LiveServer, card: RemoteCard) -> list[bytes]:
    """The digests the audit log says the user's 9A key signed."""
    records = json.loads(server.admin("audit", "export", "--json").stdout)
    subject = f"credential:{card.credential('9a')}"
    return [base64.b64decode(r["details"]["digest"]) for r in records
            if r["event"] == "sign" and r["subject"] == subject]  # fmt: skip


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LiveServer]:
    data = tmp_path / "data"
    init_data_dir(data)
    server = start_server(data)
    yield server
    server.stop()


def test_server_killed_mid_loop_then_back(
    own_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> None:
    card = card_slot.present(enroll_card(own_server, "killed", tmp_path, alg="p256"))
    card.login()
    server, port = own_server, own_server.port
    completed: list[bytes] = []
    failures = 0
    with signing(card) as key:
        for i in range(45):
            if i == 15:
                server.proc.kill()  # kill -9: no goodbye
                server.proc.wait()
            if i == 30:
                server = start_server(own_server.data, port=port)
            began = time.monotonic()
            try:
                completed.append(sign_once(key, card, f"message {i}".encode()))
            except PKCS11Error:
                failures += 1
                assert time.monotonic() - began < PROMPT  # an error, promptly, not a hang
                assert 15 <= i < 30, f"signature {i} failed while the server was up"
    assert failures == 15 and len(completed) == 30
    assert card_slot.running  # the card process never died
    assert "ecdsa with 9a failed: no server answered" in card_slot.log()  # and says why
    # One audit record per completed signature, no more and no fewer, and the chain holds.
    assert sorted(signed_digests(server, card)) == sorted(completed)
    assert server.admin("audit", "verify").returncode == 0
    server.stop()


def test_fail_over_to_the_second_server_and_back(
    own_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> None:
    second = start_server(own_server.data)  # another node of the same deployment
    first = own_server
    try:
        card = enroll_card(first, "failover", tmp_path, alg="p256",
                           servers=[first.url, second.url],
                           run_extra=["--failback-after", "2"])  # fmt: skip
        card_slot.present(card)
        card.login()
        with signing(card) as key:
            sign_once(key, card, b"through the first")
            assert card.status()["server"] == first.url
            first.proc.kill()
            first.proc.wait()
            for i in range(5):  # no error at all: the relay moves on to the second server
                sign_once(key, card, f"through the second {i}".encode())
            assert card.status()["server"] == second.url
            first = start_server(own_server.data, port=first.port)
            time.sleep(2.5)  # --failback-after 2
            sign_once(key, card, b"back to the first")
            assert card.status()["server"] == first.url
        assert first.admin("audit", "verify").returncode == 0
        assert len(signed_digests(first, card)) == 7
    finally:
        second.stop()
        first.stop()


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never says a word (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_server_that_never_answers_costs_one_timeout_then_the_next_one_signs(
    own_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> None:
    with silent_server() as hung:
        card = enroll_card(own_server, "hung", tmp_path, alg="p256",
                           servers=[own_server.url])  # fmt: skip
        config = json.loads((card.path / "card.json").read_text())
        config["servers"] = [hung, own_server.url]
        (card.path / "card.json").write_text(json.dumps(config))
        card_slot.present(card)
        began = time.monotonic()
        card.login()  # the hung server's connect timeout (3 s), then the real one
        assert 2.5 < time.monotonic() - began < 3 + PROMPT
        with signing(card) as key:
            began = time.monotonic()
            sign_once(key, card, b"the hung server is skipped now")
            assert time.monotonic() - began < 1.0
        assert card.status()["server"] == own_server.url
        assert card_slot.running


def test_revoked_user_and_server_down(
    own_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> None:
    card = card_slot.present(enroll_card(own_server, "revoked", tmp_path, alg="p256"))
    card.login()
    with signing(card) as key:
        sign_once(key, card, b"before")
        own_server.admin("revoke", card.user)
        began = time.monotonic()
        with pytest.raises(PKCS11Error):
            sign_once(key, card, b"after")
        assert time.monotonic() - began < PROMPT
    assert "session of revoked ended: the server refused" in card_slot.log()
    assert card.status()["session"]["active"] is False
    refused = card.login(check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("Error: login failed:")
    # With the server down the card is still readable: its objects come from the enrollment.
    own_server.stop()
    listed = pkcs11_tool("--list-objects", "--type", "cert")
    assert listed.count("Certificate Object") == 4
    assert card.status()["user"] == "revoked"


def test_a_login_while_every_server_is_down_fails_in_one_line(
    card_slot: CardSlot, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    init_data_dir(data)
    server = start_server(data)
    card = enroll_card(server, "down", tmp_path, alg="p256")
    server.stop()
    card_slot.present(card)
    began = time.monotonic()
    out = card.login(check=False)
    assert time.monotonic() - began < PROMPT
    assert out.returncode == 1 and "no server answered" in out.stderr, out.stderr
    assert card.status()["session"]["active"] is False
    assert card_slot.running


def test_the_session_refreshes_silently_and_keeps_its_pin_verification(
    tmp_path: Path, card_slot: CardSlot
) -> None:
    data = tmp_path / "data"
    init_data_dir(data)
    settings = json.loads((data / "server.json").read_text())
    settings["policy"] = {**settings.get("policy", {}), "access_token_ttl": 35}
    (data / "server.json").write_text(json.dumps(settings))
    server = start_server(data)
    try:
        card = card_slot.present(enroll_card(server, "refresh", tmp_path, alg="p256"))
        card.login()
        with signing(card) as key:
            sign_once(key, card, b"with the first access token")
            time.sleep(6)  # under 30 s left: the relay refreshes before the next call
            sign_once(key, card, b"with a refreshed one, the PIN still verified")
        records = json.loads(server.admin("audit", "export", "--json").stdout)
        mine = [r["event"] for r in records if r["actor"] == "user:refresh"]
        assert mine.count("login.refresh") >= 1 and mine.count("sign") == 2
        assert mine.count("pin.verify.ok") == 1  # no second VERIFY was needed
    finally:
        server.stop()
