"""Acceptance of the bridge: unchanged clients (OpenSC's PKCS#11 module, pkcs11-tool, openssl,
pyHanko, ssh) use the enrolled user's keys, which live only in the real server process's
SoftHSM2 token; the server's PIN counters are the card's.

Every signature is checked by `openssl` or pyHanko against the certificate, never by the card.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import SLOT_IDS, RemoteCard, enroll_card
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from live_server import LiveServer, free_port
from pcsc_stack import PKCS11, READER, CardSlot, pkcs11, run, wait_for
from smartcard import scard

from relay.demo import sample_pdf, sign_pdf, validate_pdf
from vcard.doctor import PcscReader

pytestmark = [pytest.mark.pcsc, pytest.mark.hsm]

SELECT_PIV = bytes.fromhex("00a4040009a00000030800001000")


def sign(card: RemoteCard, slot: str, tmp_path: Path, *, pin: str | None = None,
         ok: bool = True) -> str:  # fmt: skip
    """pkcs11-tool signs a message with ``slot``'s key; openssl verifies it against the
    certificate; returns pkcs11-tool's output."""
    data, sig = tmp_path / "data.bin", tmp_path / f"sig-{slot}.bin"
    data.write_bytes(b"a document that never leaves the workstation " + os.urandom(16))
    cert = card.certificate(slot)
    rsa = not isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    mechanism = "SHA256-RSA-PKCS" if rsa else "ECDSA-SHA256"
    extra = [] if rsa else ["--signature-format", "openssl"]
    out = pkcs11("--login", "--pin", pin or card.pin, "--sign", "--id", SLOT_IDS[slot],
                 "-m", mechanism, "-i", data, "-o", sig, *extra, ok=ok)  # fmt: skip
    if ok:
        pub = tmp_path / f"pub-{slot}.pem"
        pub.write_bytes(cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        verified = run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data)
        assert "Verified OK" in verified
    return out


@pytest.mark.parametrize("slot", ["9a", "9c", "9e"])
def test_pkcs11_tool_signs_with_the_remote_keys(
    remote_card: RemoteCard, slot: str, tmp_path: Path
) -> None:
    sign(remote_card, slot, tmp_path)


def test_the_private_keys_exist_only_in_the_servers_token(
    remote_card: RemoteCard, bridge_server: LiveServer
) -> None:
    # On the workstation: the card's configuration and the device key, nothing else secret,
    # and the device key is none of the card's keys.
    assert sorted(p.name for p in remote_card.path.iterdir()) == ["card.json", "device-key.pem"]
    device = serialization.load_pem_private_key(
        (remote_card.path / "device-key.pem").read_bytes(), None
    ).public_key()
    card_keys = [remote_card.certificate(s).public_key() for s in SLOT_IDS]
    assert device not in card_keys
    # In the server's token: the user's four private keys, sensitive and never extractable.
    data = bridge_server.data
    out = run("pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--login",
              "--pin", (data / "hsm-pin").read_text().strip(), "--list-objects",
              "--type", "privkey", "--token-label", "cardbridge",
              env={"SOFTHSM2_CONF": str(data / "softhsm2.conf")})  # fmt: skip
    mine = [block for block in out.split("Private Key Object")
            if f"{remote_card.user}/" in block]  # fmt: skip
    assert len(mine) == 4, out
    for block in mine:
        assert "never extractable" in block and "sensitive" in block, block


def test_key_management_key_decrypts_or_agrees(remote_card: RemoteCard, tmp_path: Path) -> None:
    card_pub = remote_card.certificate("9d").public_key()
    if not isinstance(card_pub, ec.EllipticCurvePublicKey):
        message = b"a 32-byte content-encryption key"
        plain, cipher, out = tmp_path / "m", tmp_path / "c", tmp_path / "p"
        plain.write_bytes(message)
        pub = tmp_path / "9d.pem"
        pub.write_bytes(card_pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        run("openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", plain,
            "-out", cipher)  # fmt: skip
        pkcs11("--login", "--pin", remote_card.pin, "--decrypt", "--id", "03", "-m", "RSA-PKCS",
               "-i", cipher, "-o", out)  # fmt: skip
        assert out.read_bytes() == message
        return
    peer = ec.generate_private_key(card_pub.curve)
    peer_der, secret = tmp_path / "peer.der", tmp_path / "secret.bin"
    peer_der.write_bytes(peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    pkcs11("--login", "--pin", remote_card.pin, "--derive", "-m", "ECDH1-DERIVE", "--id", "03",
           "-i", peer_der, "-o", secret)  # fmt: skip
    assert secret.read_bytes() == peer.exchange(ec.ECDH(), card_pub)


@pytest.fixture
def opensc_conf(tmp_path: Path) -> Iterator[Path]:
    """OpenSC re-verifies from its PIN cache for the 9C key (field-notes: pyHanko's PKCS#11
    signer does not log in with CKU_CONTEXT_SPECIFIC)."""
    conf = tmp_path / "opensc.conf"
    conf.write_text("app default {\n framework pkcs15 {\n"
                    "  pin_cache_ignore_user_consent = true;\n }\n}\n")  # fmt: skip
    old = os.environ.get("OPENSC_CONF")
    os.environ["OPENSC_CONF"] = str(conf)
    yield conf
    if old is None:
        del os.environ["OPENSC_CONF"]
    else:
        os.environ["OPENSC_CONF"] = old


@pytest.mark.parametrize("slot", ["9a", "9c"])
def test_pyhanko_signs_a_pdf_through_opensc_and_validates_it_against_the_ca(
    remote_card: RemoteCard,
    bridge_server: LiveServer,
    opensc_conf: Path,
    slot: str,
) -> None:
    signed = sign_pdf(sample_pdf("for pyHanko"), PKCS11, remote_card.pin,
                      key_id=bytes.fromhex(SLOT_IDS[slot]))  # fmt: skip
    ca = x509.load_pem_x509_certificate((bridge_server.data / "ca.pem").read_bytes())
    report = validate_pdf(signed, ca)
    assert report.intact and report.valid, report
    assert report.signer == remote_card.certificate(slot).subject.rfc4514_string()
    tampered = bytearray(signed)
    tampered[signed.index(b"for pyHanko")] ^= 0x20  # one byte of the signed content
    assert not validate_pdf(bytes(tampered), ca).intact


def test_ssh_logs_in_with_the_9a_key(remote_card: RemoteCard, tmp_path: Path) -> None:
    listed = run("ssh-keygen", "-D", PKCS11)
    keys = [line for line in listed.splitlines() if line.startswith(("ssh-", "ecdsa-"))]
    expected = remote_card.certificate("9a").public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert any(line.startswith(expected) for line in keys), listed
    with sshd(tmp_path, authorized=expected) as port:
        askpass = tmp_path / "askpass"
        askpass.write_text(f"#!/bin/sh\necho {remote_card.pin}\n")
        askpass.chmod(0o700)
        proc = subprocess.run(
            ["ssh", "-F", "/dev/null", "-I", PKCS11, "-p", str(port),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
             "root@127.0.0.1", "echo", "logged-in-with-the-card"],
            env={**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"},
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + (tmp_path / "sshd.log").read_text()
    assert proc.stdout.strip() == "logged-in-with-the-card"


class sshd:  # noqa: N801 -- used like a function: ``with sshd(...) as port``
    """An OpenSSH server on a free loopback port accepting only ``authorized``."""

    def __init__(self, where: Path, authorized: str) -> None:
        self.where = where
        self.authorized = authorized
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> int:
        port = free_port()
        host_key = self.where / "host_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key)
        keys = self.where / "authorized_keys"
        keys.write_text(self.authorized + "\n")
        keys.chmod(0o600)
        conf = self.where / "sshd_config"
        conf.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"AuthorizedKeysFile {keys}", f"PidFile {self.where / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password", "",
        ]))  # fmt: skip
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.log = (self.where / "sshd.log").open("wb")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: _listening(port), f"sshd on port {port}")
        return port

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_card_reset_clears_the_servers_pin_mark(remote_card: RemoteCard) -> None:
    with PcscReader(READER) as reader:
        assert reader.transmit(SELECT_PIV)[1] == 0x9000
        pin = remote_card.pin.encode().ljust(8, b"\xff")
        assert reader.transmit(bytes.fromhex("0020008008") + pin)[1] == 0x9000
        assert remote_card.status()["pin"]["verified_on_server"] is True
        reader.close(scard.SCARD_RESET_CARD)
    assert remote_card.status()["pin"]["verified_on_server"] is False


def test_status_logout_and_login(remote_card: RemoteCard, tmp_path: Path,
                                 card_slot: CardSlot) -> None:  # fmt: skip
    status = remote_card.status()
    assert status["user"] == remote_card.user and status["session"]["active"] is True
    assert status["server"] == remote_card.servers[0]
    human = remote_card.cli("card", "status").stdout
    assert f"user:       {remote_card.user}" in human and "session:    active" in human
    remote_card.cli("card", "logout")
    assert remote_card.status()["session"]["active"] is False
    # Without a session the card is still readable, and key use fails at once with 6982.
    listed = pkcs11("--list-objects", "--type", "cert")
    assert len(re.findall(r"^Certificate Object", listed, re.M)) == 4
    refused = sign(remote_card, "9a", tmp_path, ok=False)
    assert "CKR_USER_NOT_LOGGED_IN" in refused, refused
    assert "no session: run `cardbridge card login`" in card_slot.log()
    remote_card.login()
    sign(remote_card, "9a", tmp_path)


def test_wrong_pins_lower_the_servers_counter_until_blocked_then_unblock(
    bridge_server: LiveServer, card_slot: CardSlot, tmp_path: Path
) -> None:
    card = card_slot.present(enroll_card(bridge_server, "pins", tmp_path, alg="p256"))
    card.login()
    for left in (2, 1):
        out = sign(card, "9a", tmp_path, pin="999999", ok=False)
        assert "CKR_PIN_INCORRECT" in out, out
        assert card.status()["pin"]["retries"] == left  # the server's counter
    sign(card, "9a", tmp_path, pin="999999", ok=False)
    assert card.status()["pin"]["retries"] == 0
    assert "CKR_PIN_LOCKED" in sign(card, "9a", tmp_path, ok=False)  # blocked on the server
    # The administrator unblocks and hands out a new PIN.
    out = bridge_server.admin("unblock", card.user).stdout
    new_pin = out.split("new PIN:", 1)[1].strip()
    sign(card, "9a", tmp_path, pin=new_pin)
    # Block it again: the PUK sets a new PIN through the card (RESET RETRY COUNTER).
    for _ in range(3):
        sign(card, "9a", tmp_path, pin="999999", ok=False)
    run("pkcs15-tool", "--unblock-pin", "--puk", card.puk, "--new-pin", "24681357")
    assert card.status()["pin"]["retries"] == 3
    sign(card, "9a", tmp_path, pin="24681357")
    audit = json.loads(bridge_server.admin("audit", "export", "--json").stdout)
    mine = [r["event"] for r in audit if r["subject"] == f"user:{card.user}"]
    assert mine.count("pin.verify.failed") >= 6 and "pin.unblock" in mine

