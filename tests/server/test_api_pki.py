# SPDX-License-Identifier: Apache-2.0
"""``/tsa``, ``/crl`` and ``/ca.crt`` through the real HTTPS server process: public, with the
media types RFC 3161 §3.4 and RFC 5280 §4.2.1.13 / §4.2.2.1 name, limited in size and rate;
``admin revoke`` puts a user's certificates on the next CRL, and the certificates name the
server's public URL."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from live_server import LiveServer, credential_for, enroll_user, init_data_dir, start_server

from server.config import Policy, Settings

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

RATE = 5
PUBLIC_URL = "https://pki.example.test:9443"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("pki") / "data"
    init_data_dir(data, "--public-url", PUBLIC_URL)
    settings = Settings.load(data)
    settings.policy = Policy(tsa_per_minute=RATE)
    settings.save()
    srv = start_server(data)
    yield srv
    assert srv.stop() == 0, srv.log()


def query(tmp_path: Path) -> bytes:
    doc, out = tmp_path / "doc", tmp_path / "q.tsq"
    doc.write_bytes(b"stamped")
    subprocess.run(["openssl", "ts", "-query", "-data", doc, "-sha256", "-cert", "-out", out],
                   check=True, capture_output=True)  # fmt: skip
    return out.read_bytes()


def test_tsa_is_public_and_limited(server: LiveServer, tmp_path: Path) -> None:
    body = query(tmp_path)
    reply = server.http.post("/tsa", content=body,
                             headers={"Content-Type": "application/timestamp-query"})  # fmt: skip
    assert reply.status_code == 200 and reply.headers["content-type"] == (
        "application/timestamp-reply"
    )
    (tmp_path / "r.tsr").write_bytes(reply.content)
    check = subprocess.run(
        ["openssl", "ts", "-verify", "-in", tmp_path / "r.tsr", "-queryfile", tmp_path / "q.tsq",
         "-CAfile", server.data / "ca.pem"], capture_output=True, text=True,
    )  # fmt: skip
    assert "Verification: OK" in check.stdout, check.stderr

    wrong_type = server.http.post("/tsa", content=body, headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415 and wrong_type.json()["error"] == "unsupported_media_type"
    too_big = server.http.post("/tsa", content=bytes(5000),
                               headers={"Content-Type": "application/timestamp-query"})  # fmt: skip
    assert too_big.status_code == 413 and too_big.json()["error"] == "request_too_large"

    # At most RATE a minute: 2 * RATE + 1 requests span at most two windows.
    answers = [
        server.http.post("/tsa", content=body,
                         headers={"Content-Type": "application/timestamp-query"})
        for _ in range(2 * RATE + 1)
    ]  # fmt: skip
    refused = [a for a in answers if a.status_code == 429]
    assert refused and refused[0].json()["error"] == "rate_limited"
    assert {a.status_code for a in answers} == {200, 429}


def signing_certificate(server: LiveServer, enrollment: dict[str, Any], password: str) -> (
    x509.Certificate
):
    """The user's 9C certificate, as a CSC client reads it (credentials/info)."""
    login = server.http.post("/csc/v2/auth/login", json={},
                             auth=httpx.BasicAuth(enrollment["user"], password))  # fmt: skip
    info = server.http.post(
        "/csc/v2/credentials/info",
        json={"credentialID": credential_for(enrollment, "9c"), "certificates": "single"},
        headers={"Authorization": f"Bearer {login.json()['access_token']}"},
    )
    (b64,) = info.json()["cert"]["certificates"]
    return x509.load_der_x509_certificate(base64.b64decode(b64))


def test_crl_lists_revoked_users_and_certificates_name_the_public_url(server: LiveServer) -> None:
    ca_cert = x509.load_pem_x509_certificate((server.data / "ca.pem").read_bytes())
    issuer = server.http.get("/ca.crt")
    assert issuer.headers["content-type"] == "application/pkix-cert"
    assert issuer.content == ca_cert.public_bytes(Encoding.DER)

    rita = signing_certificate(
        server, enroll_user(server, "revoked-rita", "rita's password 1", alg="p256"),
        "rita's password 1",
    )  # fmt: skip
    ken = signing_certificate(
        server, enroll_user(server, "kept-ken", "ken's password 1", alg="p256"),
        "ken's password 1",
    )  # fmt: skip
    for cert in (rita, ken):
        (point,) = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert [n.value for n in point.full_name or []] == [f"{PUBLIC_URL}/crl"]
        (access,) = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert access.access_location.value == f"{PUBLIC_URL}/ca.crt"

    first = server.http.get("/crl")
    assert first.headers["content-type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(first.content)
    assert crl.is_signature_valid(ca_cert.public_key()) and len(crl) == 0

    server.admin("revoke", "revoked-rita")
    crl = x509.load_der_x509_crl(server.http.get("/crl").content)
    assert crl.is_signature_valid(ca_cert.public_key())
    assert len(crl) == 4  # rita's four certificates, ken's none
    assert crl.get_revoked_certificate_by_serial_number(rita.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(ken.serial_number) is None
