"""Acceptance, end to end through the CLI and the real HTTPS server process (uvicorn + FastAPI +
SoftHSM2 + SQLite): ``server init`` twice destroys nothing, ``server run`` serves and stops on
SIGTERM, the admin commands work, a tampered audit log is caught and named, and a blocked PIN
stays blocked across a restart until the PUK or an administrator unblocks it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from live_server import (
    Authenticator,
    LiveServer,
    ca_context,
    cardbridge,
    credential_for,
    enroll_user,
    init_data_dir,
    start_server,
)

from relay.dpop import DeviceKey, DpopAuth
from server.services import audit

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

PASSWORD = "tr0ub4dor&3-but-longer"
DIGEST = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # 32 bytes


def _fingerprint(data: Path) -> dict[str, str]:
    """SHA-256 of every file in DIR except the live database and SoftHSM's token.object
    (token flags SoftHSM rewrites on every login); every key object file is included."""
    return {
        str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.rglob("*"))
        if p.is_file() and p.suffix != ".db" and p.name not in ("server.url", "token.object")
    }


@dataclass
class Harness:
    data: Path
    first_init: str
    second_init: str
    before_second: dict[str, str]
    after_second: dict[str, str]
    server: LiveServer

    def restart(self) -> LiveServer:
        assert self.server.stop() == 0, self.server.log()
        self.server = start_server(self.data)
        return self.server


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    data = tmp_path_factory.mktemp("e2e") / "data"
    first = init_data_dir(data)
    before = _fingerprint(data)
    second = init_data_dir(data)
    after = _fingerprint(data)
    h = Harness(data, first, second, before, after, start_server(data))
    yield h
    assert h.server.stop() == 0, h.server.log()


@pytest.fixture
def server(harness: Harness) -> LiveServer:
    return harness.server


def test_init_creates_everything_and_a_second_run_destroys_nothing(harness: Harness) -> None:
    data = harness.data
    for name in ("server.json", "ca.pem", "admin-token", "hsm-pin"):
        assert (data / name).is_file(), name
    assert "created:" in harness.first_init and "ca.pem" in harness.first_init
    assert stat.S_IMODE((data / "admin-token").stat().st_mode) == 0o600
    assert harness.after_second == harness.before_second
    assert "nothing to create" in harness.second_init


def _handshake(server: LiveServer, version: ssl.TLSVersion, ciphers: str | None) -> str | None:
    """Connect with only ``version`` (and ``ciphers``); the suite agreed on, or None when the
    server refuses the handshake (any other failure fails the test)."""
    ctx = ca_context(server.data)
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cipher = tls.cipher()
            return cipher[0] if cipher else None
    except ssl.SSLError as e:  # the server's refusal: an alert, or the connection closed
        if not (isinstance(e, ssl.SSLEOFError) or e.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"):
            raise
        return None


def test_tls_offers_aead_suites_only(server: LiveServer) -> None:
    """Finding 11: TLS 1.2 accepted CBC suites. Now TLS 1.2 with ECDHE and AES-GCM or
    ChaCha20-Poly1305, or TLS 1.3; CBC suites are refused (and with its EC key the server has
    no static RSA key exchange to offer)."""
    tls12 = ssl.TLSVersion.TLSv1_2
    for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384",
                "ECDHE-ECDSA-AES128-SHA256"):
        assert _handshake(server, tls12, cbc) is None, cbc
    assert _handshake(server, tls12, "ECDHE-ECDSA-AES128-GCM-SHA256") == (
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    assert _handshake(server, tls12, "ECDHE-ECDSA-CHACHA20-POLY1305") is not None
    assert _handshake(server, tls12, None) in (
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    )
    assert _handshake(server, ssl.TLSVersion.TLSv1_3, None) is not None


def test_user_add_list_enroll_and_audit_verify(server: LiveServer) -> None:
    server.admin("user", "add", "alice", "--password-stdin", "--email", "alice@example.test",
                 input=PASSWORD + "\n")
    users = server.admin_json("user", "list")
    assert [u for u in users if u["name"] == "alice" and u["email"] == "alice@example.test"]

    enrollment = server.admin_json("enroll", "alice", "--alg", "p256")
    assert list(enrollment) == ["user", "pin", "puk", "otp_uri", "enrollment_code", "credentials"]
    assert enrollment["user"] == "alice"
    assert enrollment["pin"].isdigit() and 6 <= len(enrollment["pin"]) <= 8
    assert enrollment["puk"].isdigit() and len(enrollment["puk"]) == 8
    assert enrollment["otp_uri"].startswith("otpauth://totp/")
    assert pyotp.parse_uri(enrollment["otp_uri"]).now().isdigit()
    assert enrollment["enrollment_code"]
    creds = enrollment["credentials"]
    assert sorted(c["slot"].lower() for c in creds) == ["9a", "9c", "9d", "9e"]
    assert all(list(c) == ["slot", "credential_id", "alg"] and c["alg"] == "p256" for c in creds)
    assert len({c["credential_id"] for c in creds}) == 4

    verify = server.admin("audit", "verify")
    assert "OK" in verify.stdout
    events = [r["event"] for r in server.admin_json("audit", "export")]
    assert "admin.user.add" in events and "enroll" in events
    # Secrets never reach the audit log.
    export = server.admin("audit", "export").stdout
    assert enrollment["pin"] not in export and PASSWORD not in export


def test_audit_export_filters_by_user_event_and_time(server: LiveServer) -> None:
    for name in ("erin", "frank"):
        server.admin("user", "add", name, "--password-stdin", input=PASSWORD + "\n")
    erin = server.admin_json("audit", "export", "--user", "ERIN")
    assert [r["event"] for r in erin] == ["admin.user.add"]
    assert erin[0]["subject"] == "user:erin"
    since = erin[0]["time"]
    lines = server.admin("audit", "export", "--event", "admin.user.add", "--since", since)
    added = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["subject"] for r in added] == ["user:erin", "user:frank"]
    assert server.admin_json("audit", "export", "--user", "frank", "--event", "enroll") == []
    for bad in (["--since", "last tuesday"], ["--event", "everything"], ["--user", "a b"]):
        res = server.admin("audit", "export", *bad, check=False)
        assert res.returncode == 1 and res.stdout == "", res
        assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "(HTTP 400, invalid_request)" in res.stderr


def test_enroll_prints_secrets_and_a_terminal_qr_code(server: LiveServer) -> None:
    server.admin("user", "add", "qr-user", "--password-stdin", input=PASSWORD + "\n")
    out = server.admin("enroll", "qr-user", "--alg", "p256").stdout
    for label in ("PIN:", "PUK:", "enrollment code:", "otpauth://totp/"):
        assert label in out
    assert "\u2588" in out or "\u2580" in out  # segno's compact terminal QR blocks


def test_user_add_without_password_gets_a_generated_one(server: LiveServer) -> None:
    out = server.admin("user", "add", "gen-user", input="").stdout
    password = out.split("password:", 1)[1].strip()
    assert len(password) >= 12
    resp = server.http.post("/csc/v1/auth/login", json={}, auth=("gen-user", password))
    assert resp.status_code == 200, resp.text


def test_disable_blocks_login(server: LiveServer) -> None:
    server.admin("user", "add", "dora", "--password-stdin", input=PASSWORD + "\n")
    assert server.http.post("/csc/v1/auth/login", json={}, auth=("dora", PASSWORD)).is_success
    server.admin("user", "disable", "dora")
    assert [u for u in server.admin_json("user", "list") if u["name"] == "dora"][0]["disabled"]
    refused = server.http.post("/csc/v1/auth/login", json={}, auth=("dora", PASSWORD))
    assert refused.status_code == 401, refused.text


@pytest.mark.parametrize(
    "args",
    [
        ("user", "add", "alice-dup", "--password-stdin"),  # second add of the same name
        ("enroll", "nobody-here"),
        ("revoke", "nobody-here"),
        ("cert", "csr", "nobody-here", "9c"),
    ],
)
def test_admin_errors_are_one_line_and_non_zero(server: LiveServer, args: tuple[str, ...]) -> None:
    if args[-1] == "--password-stdin":
        server.admin(*args, input=PASSWORD + "\n")
    res = server.admin(*args, input=PASSWORD + "\n", check=False)
    assert res.returncode != 0
    assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_errors_without_a_server_are_one_line(tmp_path: Path, server: LiveServer) -> None:
    cases = [
        ("admin", "--data", str(tmp_path / "missing"), "user", "list"),
        ("admin", "--server", "https://127.0.0.1:9", "--token", "x", "user", "list"),
        ("admin", "--server", server.url, "--token", "wrong", "--ca", str(server.data / "ca.pem"),
         "user", "list"),
        ("admin", "user", "list"),
        ("server", "run", "--data", str(tmp_path / "missing")),
    ]
    for args in cases:
        res = cardbridge(*args, check=False)
        assert res.returncode != 0, args
        assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, (args, res.stderr)
    wrong_token = cardbridge(*cases[2], check=False)
    assert "401" in wrong_token.stderr


# -- audit tampering -------------------------------------------------------------------------


def _db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(data / "cardbridge.db", timeout=30, isolation_level=None)


def _edit(con: sqlite3.Connection, seq: int) -> Any:
    (old,) = con.execute("SELECT subject FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    con.execute("UPDATE audit_log SET subject = 'user:mallory' WHERE seq = ?", (seq,))
    return lambda: con.execute("UPDATE audit_log SET subject = ? WHERE seq = ?", (old, seq))


def _delete(con: sqlite3.Connection, seq: int) -> Any:
    row = con.execute("SELECT * FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    con.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
    marks = ",".join("?" * len(row))
    return lambda: con.execute(f"INSERT INTO audit_log VALUES ({marks})", row)  # noqa: S608


def _reorder(con: sqlite3.Connection, seq: int) -> Any:
    # Swap two neighbours' positions in the chain by swapping their sequence numbers.
    def swap() -> None:
        con.execute("BEGIN")
        con.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (seq,))
        con.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq, seq + 1))
        con.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (seq + 1,))
        con.execute("COMMIT")

    swap()
    return swap


@pytest.mark.parametrize("tamper", [_edit, _delete, _reorder], ids=["edit", "delete", "reorder"])
def test_tampered_audit_log_fails_verify_and_names_the_record(
    server: LiveServer, tamper: Any
) -> None:
    for i in range(3):  # enough records of our own, whatever ran before
        server.admin("user", "add", f"audit-{tamper.__name__[1:]}-{i}", "--password-stdin",
                     input=PASSWORD + "\n")
    assert server.admin("audit", "verify").returncode == 0
    con = _db(server.data)
    try:
        (count,) = con.execute("SELECT count(*) FROM audit_log").fetchone()
        assert count >= 4
        seq = 2
        undo = tamper(con, seq)
        res = server.admin("audit", "verify", check=False)
        assert res.returncode != 0
        assert f"record {seq}:" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        undo()
    finally:
        con.close()
    assert server.admin("audit", "verify").returncode == 0


def _cut(con: sqlite3.Connection, keep: int) -> None:
    con.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
    row = con.execute("SELECT hash FROM audit_log WHERE seq = ?", (keep,)).fetchone()
    con.execute("UPDATE audit_head SET last_seq = ?, last_hash = ?",
                (keep, row[0] if row else audit.GENESIS_HASH))


def _rechain(con: sqlite3.Connection, seq: int) -> None:
    """Edit record ``seq`` and recompute every hash after it and the head: a consistent hash
    chain, as whoever can write the database can make one."""
    con.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = ?", (seq,))
    (prev,) = con.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq - 1,)).fetchone()
    rows = con.execute("SELECT seq, time, actor, event, subject, details FROM audit_log "
                       "WHERE seq >= ? ORDER BY seq", (seq,)).fetchall()
    for n, time, actor, event, subject, details in rows:
        digest = audit.record_hash(n, time, actor, event, subject, details, prev)
        con.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?",
                    (prev, digest, n))
        prev = digest
    con.execute("UPDATE audit_head SET last_hash = ?", (prev,))


@pytest.mark.parametrize(
    "tamper",
    [lambda con, last: _cut(con, last - 2), lambda con, last: _cut(con, 0),
     lambda con, last: _rechain(con, 2)],
    ids=["truncate", "wipe", "rechain"],
)
def test_audit_verify_with_a_checkpoint_catches_cuts_and_rewrites(
    server: LiveServer, tmp_path: Path, tamper: Any
) -> None:
    """Finding 4 through the CLI: a checkpoint the admin kept outside the database (and the one
    the server exported when it started) holds; then whoever can write the database cuts the
    chain back, wipes it, or re-chains an edit: `audit verify --checkpoint` fails."""
    exported = server.data / "audit-checkpoints.jsonl"
    assert exported.is_file() and stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert server.admin("audit", "verify", "--checkpoint", str(exported)).returncode == 0
    server.admin("user", "add", f"cut-{tmp_path.name}"[:64], "--password-stdin",
                 input=PASSWORD + "\n")
    kept = tmp_path / "kept.jsonl"
    server.admin("audit", "checkpoint", "--append", str(kept))
    ok = server.admin("audit", "verify", "--checkpoint", str(kept))
    assert "checkpoint" in ok.stdout and "held" in ok.stdout
    con = _db(server.data)
    try:
        rows = con.execute("SELECT * FROM audit_log ORDER BY seq").fetchall()
        head = con.execute("SELECT last_seq, last_hash FROM audit_head").fetchone()
        con.execute("BEGIN")
        tamper(con, head[0])
        con.execute("COMMIT")
        res = server.admin("audit", "verify", "--checkpoint", str(kept), check=False)
        assert res.returncode != 0
        assert "audit log BROKEN at record" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    finally:
        con.execute("BEGIN")
        con.execute("DELETE FROM audit_log")
        marks = ",".join("?" * len(rows[0]))
        con.executemany(f"INSERT INTO audit_log VALUES ({marks})", rows)  # noqa: S608
        con.execute("UPDATE audit_head SET last_seq = ?, last_hash = ?", head)
        con.execute("COMMIT")
        con.close()
    assert server.admin("audit", "verify", "--checkpoint", str(kept)).returncode == 0


# -- PIN blocking across a restart ----------------------------------------------------------


def _authorize(
    server: LiveServer, token: str, cred: str, pin: str, app: Authenticator | None = None
) -> httpx.Response:
    """credentials/authorize with the PIN, and a fresh TOTP from ``app`` (the default policy
    needs one; a request refused for its PIN first is sent without)."""
    otp = {"OTP": app.code()} if app is not None else {}
    return server.http.post(
        "/csc/v1/credentials/authorize",
        json={"credentialID": cred, "numSignatures": 1, "hash": [DIGEST], "PIN": pin, **otp},
        headers={"Authorization": f"Bearer {token}"},
    )


def _csc_token(server: LiveServer, user: str) -> str:
    resp = server.http.post("/csc/v1/auth/login", json={}, auth=(user, PASSWORD))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def _wrong(pin: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in pin)


def test_three_wrong_pins_block_across_restart_until_puk_or_admin_unblock(
    harness: Harness,
) -> None:
    server = harness.server
    enrollment = enroll_user(server, "bob", PASSWORD, alg="p256")
    pin, puk = enrollment["pin"], enrollment["puk"]
    app = Authenticator(pyotp.parse_uri(enrollment["otp_uri"]))
    cred = credential_for(enrollment, "9c")
    token = _csc_token(server, "bob")
    assert _authorize(server, token, cred, pin, app).status_code == 200

    codes = [_authorize(server, token, cred, _wrong(pin)) for _ in range(3)]
    assert [r.json()["error"] for r in codes[:2]] == ["invalid_pin", "invalid_pin"]
    refused = _authorize(server, token, cred, pin)
    assert refused.status_code in (400, 403) and refused.json()["error"] == "pin_blocked"

    server = harness.restart()
    token = _csc_token(server, "bob")
    still = _authorize(server, token, cred, pin)
    assert still.json()["error"] == "pin_blocked", still.text

    # The PUK unblocks and sets a new PIN (SP 800-73-4 RESET RETRY COUNTER, server-side).
    device = DeviceKey.generate()
    enrolled = server.http.post(
        "/api/v1/devices/enroll",
        json={"code": enrollment["enrollment_code"], "device_public_key": device.public_pem()},
    )
    assert enrolled.status_code == 200, enrolled.text
    login = server.http.post(
        "/api/v1/auth/login",
        json={"username": "bob", "password": PASSWORD, "otp": app.code()},
        auth=DpopAuth(device),
    )
    assert login.status_code == 200, login.text
    new_pin = "24681357"
    unblocked = server.http.post(
        "/api/v1/pin/unblock",
        json={"puk": puk, "new_pin": new_pin},
        auth=DpopAuth(device, login.json()["access_token"]),
    )
    assert unblocked.is_success, unblocked.text
    assert _authorize(server, token, cred, new_pin, app).status_code == 200

    # Block again; this time the administrator unblocks and hands out a new PIN.
    for _ in range(3):
        _authorize(server, token, cred, _wrong(new_pin))
    assert _authorize(server, token, cred, new_pin).json()["error"] == "pin_blocked"
    out = server.admin("unblock", "bob").stdout
    admin_pin = out.split("new PIN:", 1)[1].strip()
    assert _authorize(server, token, cred, admin_pin, app).status_code == 200
    assert server.admin("audit", "verify").returncode == 0


def test_run_with_two_workers_serves_and_stops_cleanly(tmp_path: Path) -> None:
    """``--workers 2``: each worker opens its own HSM session; SIGTERM stops both, exit 0."""
    data = tmp_path / "data"
    init_data_dir(data)
    server = start_server(data, workers=2)
    try:
        assert server.admin("audit", "verify").returncode == 0
        enrollment = enroll_user(server, "w2", PASSWORD, alg="p256")
        token = _csc_token(server, "w2")
        cred = credential_for(enrollment, "9c")
        otp = pyotp.parse_uri(enrollment["otp_uri"]).now()
        auth = server.http.post(
            "/csc/v2/credentials/authorize",
            json={"credentialID": cred, "numSignatures": 4, "hashes": [DIGEST] * 4,
                  "hashAlgorithmOID": "2.16.840.1.101.3.4.2.1",
                  "authData": [{"id": "PIN", "value": enrollment["pin"]},
                               {"id": "OTP", "value": otp}]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert auth.status_code == 200, auth.text
        # Several connections, so both workers' HSM sessions sign.
        for _ in range(4):
            with httpx.Client(base_url=server.url, verify=ca_context(data), timeout=60) as http:
                signed = http.post(
                    "/csc/v2/signatures/signHash",
                    json={"credentialID": cred, "SAD": auth.json()["SAD"], "hashes": [DIGEST],
                          "signAlgo": "1.2.840.10045.4.3.2"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert signed.status_code == 200, signed.text
    finally:
        rc = server.stop()
    assert rc == 0, server.log()
    assert not (data / "server.url").exists()
