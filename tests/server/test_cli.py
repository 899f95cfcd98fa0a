"""Fast tests of ``cardbridge admin`` / ``server`` and the Administration API client against
a fake Administration API (``httpx.MockTransport``); the real process is in test_e2e_cli.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from server import cli
from server.adminclient import AdminApiError, AdminClient
from server.config import Policy, Settings

Handler = Callable[[httpx.Request], httpx.Response]
ENROLLED = {
    "user": "alice",
    "pin": "123456",
    "puk": "12345678",
    "otp_uri": "otpauth://totp/cardbridge:alice?secret=JBSWY3DPEHPK3PXP&issuer=cardbridge",
    "enrollment_code": "ABCD-EFGH",
    "credentials": [
        {"slot": s, "credential_id": f"c{s}", "alg": "p256", "extra": 1}
        for s in ("9a", "9c", "9d", "9e")
    ],
    "unexpected": "not printed",
}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    """Route ``cardbridge admin --server …`` to a fake API; returns the requests it saw."""

    def install(handler: Handler) -> list[httpx.Request]:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        def factory(url: str, token: str, *, ca_file: Path | None = None) -> AdminClient:
            return AdminClient(url, token, ca_file=ca_file, transport=httpx.MockTransport(record))

        monkeypatch.setattr(cli, "AdminClient", factory)
        return seen

    return install


def admin(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(
        cli.admin_app, ["--server", "https://srv.test", "--token", "tok", *args], input=input
    )


def test_enroll_json_prints_exactly_the_contract(api: Any) -> None:
    seen = api(lambda r: httpx.Response(200, json=ENROLLED))
    res = admin("enroll", "alice", "--alg", "rsa2048", "--otp-per-signature", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert list(out) == ["user", "pin", "puk", "otp_uri", "enrollment_code", "credentials"]
    assert out["credentials"][0] == {"slot": "9a", "credential_id": "c9a", "alg": "p256"}
    (req,) = seen
    assert req.method == "POST" and req.url.path == "/api/v1/admin/users/alice/enroll"
    assert req.headers["authorization"] == "Bearer tok"
    assert json.loads(req.content) == {"alg": "rsa2048", "otp_per_signature": True}


def test_enroll_text_shows_secrets_and_qr(api: Any) -> None:
    api(lambda r: httpx.Response(200, json=ENROLLED))
    res = admin("enroll", "alice")
    assert res.exit_code == 0
    assert "PIN:             123456" in res.stdout and "ABCD-EFGH" in res.stdout
    assert "\u2588" in res.stdout or "\u2580" in res.stdout


def test_server_errors_become_one_line(api: Any) -> None:
    body = {"error": "conflict", "error_description": "user 'alice' already exists"}
    api(lambda r: httpx.Response(409, json=body))
    res = admin("user", "add", "alice", "--password-stdin", input="pw-pw-pw-pw\n")
    assert res.exit_code == 1
    assert res.stderr == "Error: user 'alice' already exists (HTTP 409, conflict)\n"


def test_user_add_sends_the_password_from_stdin_and_never_prints_it(api: Any) -> None:
    seen = api(lambda r: httpx.Response(201, json={"name": "bob", "disabled": False}))
    res = admin("user", "add", "bob", "--password-stdin", "--upn", "bob@corp.test",
                input="s3cret-pass\n")
    assert res.exit_code == 0
    assert json.loads(seen[0].content) == {"name": "bob", "password": "s3cret-pass",
                                           "upn": "bob@corp.test"}
    assert "s3cret-pass" not in res.output


def test_user_add_without_a_terminal_lets_the_server_generate(api: Any) -> None:
    seen = api(lambda r: httpx.Response(201, json={"name": "bob", "password": "gen-erated"}))
    res = admin("user", "add", "bob", input="")
    assert res.exit_code == 0
    assert json.loads(seen[0].content) == {"name": "bob"}
    assert "password: gen-erated" in res.stdout


def test_audit_verify_names_the_first_bad_record(api: Any) -> None:
    api(lambda r: httpx.Response(200, json={
        "ok": False, "records": 9, "first_bad": 4, "reason": "contents do not match its hash"}))
    res = admin("audit", "verify")
    assert res.exit_code == 1
    assert res.stderr == (
        "Error: audit log BROKEN at record 4: contents do not match its hash\n"
    )


def test_audit_verify_ok(api: Any) -> None:
    api(lambda r: httpx.Response(200, json={"ok": True, "records": 9}))
    res = admin("audit", "verify")
    assert res.exit_code == 0 and "audit log OK: 9 records" in res.stdout


def test_audit_verify_sends_the_latest_checkpoint_of_the_file(api: Any, tmp_path: Path) -> None:
    cps = [{"seq": n, "hash": "a" * 64, "count": n, "time": "t", "mac": "b" * 64}
           for n in (3, 9, 5)]
    path = tmp_path / "audit-checkpoints.jsonl"
    path.write_text("".join(json.dumps(cp) + "\n" for cp in cps) + "\n")
    seen = api(lambda r: httpx.Response(200, json={"ok": True, "records": 12}))
    res = admin("audit", "verify", "--checkpoint", str(path))
    assert res.exit_code == 0, res.output
    assert "audit log OK: 12 records, checkpoint 9 held" in res.stdout
    (req,) = seen
    assert (req.method, req.url.path) == ("POST", "/api/v1/admin/audit/verify")
    assert json.loads(req.content) == {"checkpoints": [cps[1]]}
    path.write_text("not json\n")
    res = admin("audit", "verify", "--checkpoint", str(path))
    assert res.exit_code == 1 and res.stderr == f"Error: {path}:1: not a checkpoint\n"


def test_audit_checkpoint_appends_to_a_file(api: Any, tmp_path: Path) -> None:
    cp = {"seq": 4, "hash": "a" * 64, "count": 4, "time": "t", "mac": "b" * 64}
    api(lambda r: httpx.Response(200, json=cp))
    path = tmp_path / "kept.jsonl"
    for _ in range(2):
        assert admin("audit", "checkpoint", "--append", str(path)).exit_code == 0
    assert [json.loads(line) for line in path.read_text().splitlines()] == [cp, cp]


def test_user_unlock(api: Any) -> None:
    seen = api(lambda r: httpx.Response(200, json={"name": "bob", "login_locked": False}))
    res = admin("user", "unlock", "bob")
    assert res.exit_code == 0 and res.stdout == "user bob unlocked\n"
    assert (seen[0].method, seen[0].url.path) == ("POST", "/api/v1/admin/users/bob/unlock")


def test_unreachable_server_is_one_line(api: Any) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    api(refuse)
    res = admin("user", "list")
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: cannot reach the server at https://srv.test")
    assert res.stderr.count("\n") == 1


def test_names_are_one_path_segment(api: Any) -> None:
    seen = api(lambda r: httpx.Response(200, json={}))
    assert admin("user", "disable", "a/../b").exit_code == 0
    assert seen[0].url.raw_path == b"/api/v1/admin/users/a%2F..%2Fb/disable"


def test_cert_import_sends_pem_and_rejects_non_certificates(api: Any, tmp_path: Path) -> None:
    seen = api(lambda r: httpx.Response(200, json={}))
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a certificate")
    res = admin("cert", "import", "alice", "9C", str(bad))
    assert res.exit_code == 1 and res.stderr.startswith("Error: not an X.509 certificate")
    assert seen == []


def test_cert_csr_writes_the_file(api: Any, tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
    seen = api(lambda r: httpx.Response(200, json={"csr": pem}))
    out = tmp_path / "alice.csr"
    res = admin("cert", "csr", "alice", "9c", "-o", str(out))
    assert res.exit_code == 0 and out.read_text() == pem
    assert seen[0].url.path == "/api/v1/admin/users/alice/certs/9c/csr"


def test_admin_needs_a_target() -> None:
    res = CliRunner().invoke(cli.admin_app, ["user", "list"], env={cli.TOKEN_ENV: ""})
    assert res.exit_code == 1 and "give --data DIR" in res.stderr


def test_admin_client_reports_non_json_errors() -> None:
    client = AdminClient(
        "https://srv.test", "t", transport=httpx.MockTransport(lambda r: httpx.Response(502))
    )
    with pytest.raises(AdminApiError) as e, client:
        client.list_users()
    assert e.value.status == 502 and str(e.value) == "Bad Gateway (HTTP 502)"


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),  # noqa: S104
    ],
)
def test_parse_bind(bind: str, expected: tuple[str, int]) -> None:
    assert cli.parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["8443", "host:", ":8443", "h:70000", "h:x"])
def test_parse_bind_rejects(bind: str) -> None:
    with pytest.raises(cli.CliError):
        cli.parse_bind(bind)


def test_local_url_maps_wildcards_to_loopback() -> None:
    assert cli.local_url("0.0.0.0", 8443) == "https://127.0.0.1:8443"  # noqa: S104
    assert cli.local_url("::", 1) == "https://[::1]:1"
    assert cli.local_url("srv.example", 2) == "https://srv.example:2"


def test_server_run_on_a_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.server_app, ["run", "--data", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1


def test_server_status_prints_the_policy(tmp_path: Path) -> None:
    """Finding 10: whether CSC authorizations need a TOTP is a server setting, and `server
    status` says which one is in force."""
    settings = Settings.for_data_dir(tmp_path, db_url="postgresql://u:secret@db/cb")
    settings.save()
    res = CliRunner().invoke(cli.server_app, ["status", "--data", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    status = json.loads(res.stdout)
    assert status["policy"]["csc_authorize_otp"] is True
    assert status["policy"] == Policy().model_dump(mode="json")
    assert "secret" not in res.stdout and status["database"] == "postgresql://u:***@db/cb"
    settings.policy = Policy(csc_authorize_otp=False)
    settings.save()
    res = CliRunner().invoke(cli.server_app, ["status", "--data", str(tmp_path)])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if "csc_authorize_otp" in x)
    assert line.split() == ["csc_authorize_otp:", "false"]
