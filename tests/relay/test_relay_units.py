"""The relay's pure parts, fast: enrollment codes, the refusal → status word table, what a
sole-control approval shows and how it times out, Server-Timing, the configuration files and the
control channel's socket."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from relay import control
from relay.backend import Approvals, _describe_block, card_error
from relay.client import ServerRefused, _server_timing
from relay.config import CardConfig, CredentialInfo, write_atomic
from relay.dpop import DeviceKey
from relay.enroll import EnrollmentRefused, parse_code
from vcard.constants import SW
from vcard.errors import SecurityStatusNotSatisfied

PIN_B64 = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()


def test_enrollment_codes() -> None:
    assert parse_code(f" secret.{PIN_B64}\n") == ("secret", PIN_B64)
    for bad in ("", "secret", f".{PIN_B64}", "secret.short", "secret.!!!"):
        with pytest.raises(EnrollmentRefused, match="not an enrollment code"):
            parse_code(bad)


@pytest.mark.parametrize(
    ("code", "retries", "sw"),
    [
        ("invalid_pin", 2, 0x63C2),
        ("invalid_puk", 1, 0x63C1),
        ("invalid_pin", 0, SW.AUTH_METHOD_BLOCKED),
        ("pin_blocked", None, SW.AUTH_METHOD_BLOCKED),
        ("pin_required", None, SW.SECURITY_STATUS_NOT_SATISFIED),
        ("invalid_otp", None, SW.SECURITY_STATUS_NOT_SATISFIED),
        ("unauthorized", None, SW.SECURITY_STATUS_NOT_SATISFIED),
        ("forbidden", None, SW.CONDITIONS_NOT_SATISFIED),
        ("not_found", None, SW.CONDITIONS_NOT_SATISFIED),
        ("rate_limited", None, SW.CONDITIONS_NOT_SATISFIED),
        ("invalid_padding", None, SW.INCORRECT_DATA),
        ("invalid_request", None, SW.INCORRECT_DATA),
        ("hsm_error", None, SW.EXECUTION_ERROR),
        ("something_new", None, SW.EXECUTION_ERROR),
    ],
)
def test_refusals_become_documented_status_words(code: str, retries: int | None, sw: int) -> None:
    assert card_error(ServerRefused(400, code, "why", retries)).sw == sw


def test_an_approval_shows_the_digest_that_is_signed() -> None:
    digest = hashlib.sha256(b"document").digest()
    prefix = bytes.fromhex("3031300d060960864801650304020105000420")
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(prefix) - 32) + b"\x00" + prefix + digest
    assert _describe_block(block) == ("RSA PKCS#1 v1.5, sha256", digest.hex())
    pss = b"\x00" + os.urandom(255)  # no digest shows in a PSS encoding
    assert _describe_block(pss) == ("RSA PSS block (its SHA-256)", hashlib.sha256(pss).hexdigest())


def test_approvals_time_out_and_are_handed_out_oldest_first() -> None:
    approvals = Approvals(timeout=0.3)
    began = time.monotonic()
    with pytest.raises(SecurityStatusNotSatisfied, match="no approval within 0.3 s"):
        with approvals.waiting("9c", "ecdsa", "ab"):
            pass
    assert 0.3 <= time.monotonic() - began < 2 and approvals.pending() == []
    with pytest.raises(LookupError, match="no signature waits"):
        approvals.approve("123456")

    got: dict[str, str | None] = {}
    approvals.timeout = 5

    def sign(digest: str) -> None:
        with approvals.waiting("9c", "ecdsa", digest) as approval:
            got[digest] = approval.otp

    threads = [threading.Thread(target=sign, args=(d,)) for d in ("first", "second")]
    for t in threads:
        t.start()
        while len(approvals.pending()) < threads.index(t) + 1:
            time.sleep(0.01)
    first, second = approvals.pending()
    assert (first.digest, second.digest) == ("first", "second")
    approvals.approve("111111")  # the oldest
    approvals.approve("222222", second.id)
    with pytest.raises(LookupError, match="no signature #99"):
        approvals.approve("333333", 99)
    for t in threads:
        t.join(5)
    assert got == {"first": "111111", "second": "222222"}


def test_server_timing_header() -> None:
    assert _server_timing("app;dur=1.25, hsm;dur=0.1") == {"app": 1.25, "hsm": 0.1}
    assert _server_timing('app;desc="x";dur=2, junk, hsm;dur=abc') == {"app": 2.0}
    assert _server_timing(None) == {}


def test_device_key_proofs_verify_with_its_public_key() -> None:
    key = DeviceKey.generate()
    proof = key.proof("POST", "https://h:1/p?q=1#f", access_token="t", now=1000)
    header, claims, sig = proof.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    head = json.loads(base64.urlsafe_b64decode(pad(header)))
    body = json.loads(base64.urlsafe_b64decode(pad(claims)))
    assert head["typ"] == "dpop+jwt" and head["alg"] == "ES256" and "d" not in head["jwk"]
    assert body["htu"] == "https://h:1/p" and body["htm"] == "POST" and body["iat"] == 1000
    again = DeviceKey.from_pem(key.private_pem())
    assert again.thumbprint() == key.thumbprint() and len(key.thumbprint()) == 43
    raw = base64.urlsafe_b64decode(pad(sig))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = serialization.load_pem_public_key(key.public_pem().encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ValueError, match="P-256"):
        DeviceKey(ec.generate_private_key(ec.SECP384R1()))


def test_configuration_round_trip_and_refusals(tmp_path: Path) -> None:
    config = CardConfig(["https://a"], "PEM", "pin", "alice", "dev",
                        [CredentialInfo("9a", "c1", "p256", "CERT", False, False)])  # fmt: skip
    again = CardConfig.from_dict(json.loads(json.dumps(config.as_dict())))
    assert again == config and len(bytes.fromhex(again.card_guid)) == 16
    with pytest.raises(ValueError, match="not a cardbridge card configuration"):
        CardConfig.from_dict({**config.as_dict(), "version": 99})
    with pytest.raises(ValueError, match="malformed"):
        CardConfig.from_dict({"format": "cardbridge-remote-card", "version": 1})
    target = tmp_path / "secret"
    write_atomic(target, b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_control_channel_round_trip_permissions_and_stale_sockets(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    seen: list[dict[str, object]] = []

    def handle(request: dict[str, object]) -> dict[str, object]:
        seen.append(request)
        if request["op"] == "boom":
            raise RuntimeError("handler bug")
        return {"ok": request["op"] == "ping", "error": "nope", "echo": request.get("x")}

    server = control.ControlServer(path, handle)
    server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert control.request(path, "ping", x=5)["echo"] == 5
        with pytest.raises(control.ControlError, match="nope"):
            control.request(path, "other")
        with pytest.raises(control.ControlError, match="internal error: RuntimeError"):
            control.request(path, "boom")
        with pytest.raises(control.ControlError, match="a card already runs"):
            control.ControlServer(path, handle)
        with socket.socket(socket.AF_UNIX) as raw:  # not JSON: refused, the server goes on
            raw.connect(str(path))
            raw.sendall(b"not json\n")
            assert b"bad request" in raw.recv(1000)
        assert control.request(path, "ping")["ok"] is True
    finally:
        server.close()
    assert not path.exists()
    with pytest.raises(control.CardNotRunning, match="no card is running"):
        control.request(path, "ping")
    with socket.socket(socket.AF_UNIX) as stale:  # a socket left by a crashed card
        stale.bind(str(path))
    with pytest.raises(control.CardNotRunning, match="nothing listens"):
        control.request(path, "ping")
    replaced = control.ControlServer(path, handle)
    replaced.close()
