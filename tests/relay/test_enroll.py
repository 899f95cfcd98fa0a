"""``cardbridge card enroll`` against real server processes: the code pins the CA, so a server
of another deployment, or an impostor that serves the right CA certificate with a TLS
certificate of its own, never receives the code; a code works once; the configuration is
private and complete."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import PASSWORD, RemoteCard, enroll_card
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from live_server import LiveServer, enroll_user, init_data_dir, start_server

pytestmark = [pytest.mark.hsm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("enroll") / "data"
    init_data_dir(data)
    srv = start_server(data)
    yield srv
    assert srv.stop() == 0


def card_for(server: LiveServer, name: str, into: Path) -> tuple[RemoteCard, str]:
    """An enrolled user whose card is NOT enrolled yet: the card and the code."""
    enrollment = enroll_user(server, name, PASSWORD, alg="p256")
    card = RemoteCard(into / "config", into / "run", [server.url], enrollment)
    return card, str(enrollment["enrollment_code"])


def test_enrollment_stores_a_private_complete_configuration(
    server: LiveServer, tmp_path: Path
) -> None:
    card = enroll_card(server, "complete", tmp_path, alg="p256")
    assert stat.S_IMODE(card.path.stat().st_mode) == 0o700
    for name in ("card.json", "device-key.pem"):
        assert stat.S_IMODE((card.path / name).stat().st_mode) == 0o600
    config = json.loads((card.path / "card.json").read_text())
    assert config["servers"] == [server.url] and config["user"] == "complete"
    assert config["ca_pem"] == (server.data / "ca.pem").read_text()
    assert {c["slot"] for c in config["credentials"]} == {"9a", "9c", "9d", "9e"}
    assert "token" not in json.dumps(config).lower()  # no session is ever stored
    out = card.cli("card", "enroll", "--server", server.url, "--code", "x.y", check=False)
    assert out.returncode == 1 and "already enrolled" in out.stderr  # never silently replaced


def test_a_code_works_once(server: LiveServer, tmp_path: Path) -> None:
    card, code = card_for(server, "once", tmp_path)
    card.cli("card", "enroll", "--server", server.url, "--code", code)
    again = card.cli("card", "enroll", "--server", server.url, "--code", code, "--force",
                     check=False)  # fmt: skip
    assert again.returncode == 1
    assert again.stderr == ("Error: enrollment failed: invalid, expired or already used "
                            "enrollment code (invalid_request)\n")  # fmt: skip


@pytest.mark.parametrize("code", ["", "nodot", "secret.not-a-sha256", "a.b.c"])
def test_malformed_codes_get_one_line(server: LiveServer, tmp_path: Path, code: str) -> None:
    card, _ = card_for(server, f"bad-{abs(hash(code)) % 10**8}", tmp_path)
    out = card.cli("card", "enroll", "--server", server.url, "--code", code, check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "not an enrollment code" in out.stderr


def test_a_server_of_another_deployment_never_sees_the_code(
    server: LiveServer, tmp_path: Path
) -> None:
    other_data = tmp_path / "other"
    init_data_dir(other_data)
    other = start_server(other_data)
    try:
        card, code = card_for(server, "pinned", tmp_path)
        out = card.cli("card", "enroll", "--server", other.url, "--code", code, check=False)
        assert out.returncode == 1
        assert "presents another CA than the enrollment code names" in out.stderr
        assert "the code was not sent" in out.stderr
        # The code is still unused: the right server accepts it.
        card.cli("card", "enroll", "--server", server.url, "--code", code)
    finally:
        other.stop()


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Serves the real CA's certificate, with a TLS certificate of its own; records posts."""

    ca_pem: bytes = b""
    posted: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/x-pem-file")
        self.end_headers()
        self.wfile.write(self.ca_pem)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        self.posted.append(self.rfile.read(length).decode())
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _self_signed(where: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = where / "impostor.pem", where / "impostor.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def test_an_impostor_with_the_right_ca_certificate_never_sees_the_code(
    server: LiveServer, tmp_path: Path
) -> None:
    _Impostor.ca_pem = (server.data / "ca.pem").read_bytes()
    _Impostor.posted = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}"
        card, code = card_for(server, "impostor", tmp_path)
        out = card.cli("card", "enroll", "--server", url, "--code", code, check=False)
        assert out.returncode == 1, out.stdout
        assert "TLS certificate is not from the CA the code names" in out.stderr
        assert _Impostor.posted == []  # the secret never left the workstation
        assert not (card.path / "card.json").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()
