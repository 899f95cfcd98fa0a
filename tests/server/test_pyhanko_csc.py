"""Acceptance: pyHanko's unchanged ``CSCSigner`` signs PDFs against the real HTTPS server
process (SoftHSM2 keys), and pyHanko's validator, trusting only the server's CA, finds each
signature intact and valid.

The flow is what a CSC client does (csc-api.md §4): ``/csc/v1/auth/login`` with HTTP Basic ->
access token; ``credentials/info`` (``fetch_certs_in_csc_credential``); per batch
``credentials/authorize`` with PIN and a fresh TOTP (v1 field names); ``signatures/signHash``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pyotp
import pytest
from asn1crypto import x509 as asn1_x509
from live_server import (
    HttpsEndpoint,
    LiveServer,
    ca_context,
    credential_for,
    enroll_user,
    init_data_dir,
    start_server,
)
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter
from pyhanko.sign import signers
from pyhanko.sign.signers.csc_signer import (
    CSCAuthorizationInfo,
    CSCAuthorizationManager,
    CSCServiceSessionInfo,
    CSCSigner,
    fetch_certs_in_csc_credential,
)
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("pyhanko") / "data"
    init_data_dir(data)
    srv = start_server(data)
    yield srv
    assert srv.stop() == 0


class PinOtpAuthorizationManager(CSCAuthorizationManager):
    """Authorizes each batch with ``credentials/authorize`` (v1 body: PIN + OTP + hashes)."""

    def __init__(
        self,
        session_info: CSCServiceSessionInfo,
        credential_info: Any,
        http: aiohttp.ClientSession,
        pin: str,
        totp: pyotp.TOTP,
    ) -> None:
        super().__init__(session_info, credential_info)
        self.http = http
        self.pin = pin
        self.totp = totp
        self.authorizations = 0

    async def authorize_signature(self, hash_b64s: list[str]) -> CSCAuthorizationInfo:
        body = self.format_csc_auth_request(pin=self.pin, otp=self.totp.now(), hash_b64s=hash_b64s)
        url = self.csc_session_info.endpoint_url("credentials/authorize")
        async with self.http.post(url, json=body, headers=self.auth_headers) as resp:
            resp.raise_for_status()
            self.authorizations += 1
            return self.parse_csc_auth_response(await resp.json())


def tiny_pdf() -> bytes:
    """A one-page PDF made with pyHanko's own writer."""
    w = PdfFileWriter()
    contents = w.add_object(generic.StreamObject(stream_data=b"BT ET"))
    w.insert_page(PageObject(contents=contents, media_box=(0, 0, 200, 200)))
    out = BytesIO()
    w.write(out)
    return out.getvalue()


def csc_login(server: HttpsEndpoint, user: str) -> str:
    """``/csc/v1/auth/login`` with HTTP Basic -> the access token."""
    resp = server.http.post("/csc/v1/auth/login", json={}, auth=httpx.BasicAuth(user, PASSWORD))
    assert resp.status_code == 200, resp.text
    token = resp.json()["access_token"]
    assert isinstance(token, str) and token
    return token


async def sign_and_validate(
    server: HttpsEndpoint,
    enrollment: dict[str, Any],
    *,
    prefer_pss: bool,
    connection_per_request: bool = False,
) -> tuple[Any, PinOtpAuthorizationManager, bytes]:
    user = enrollment["user"]
    info = CSCServiceSessionInfo(
        service_url=server.url,
        credential_id=credential_for(enrollment, "9c"),
        oauth_token=csc_login(server, user),
        api_ver="v1",
    )
    connector = aiohttp.TCPConnector(
        ssl=ca_context(server.data), force_close=connection_per_request
    )
    async with aiohttp.ClientSession(connector=connector) as http:
        cred_info = await fetch_certs_in_csc_credential(http, info)
        auth = PinOtpAuthorizationManager(
            info, cred_info, http, enrollment["pin"], pyotp.parse_uri(enrollment["otp_uri"])
        )
        signer = CSCSigner(http, auth_manager=auth, prefer_pss=prefer_pss)
        meta = signers.PdfSignatureMetadata(field_name="Signature1", md_algorithm="sha256")
        out = await signers.async_sign_pdf(
            IncrementalPdfFileWriter(BytesIO(tiny_pdf())), meta, signer=signer
        )
    signed = out.getvalue()

    ca_cert = asn1_x509.Certificate.load(_pem_to_der(server.data / "ca.pem"))
    vc = ValidationContext(trust_roots=[ca_cert], allow_fetching=False, revocation_mode="soft-fail")
    emb = PdfFileReader(BytesIO(signed)).embedded_signatures
    assert len(emb) == 1
    status = await async_validate_pdf_signature(emb[0], vc)
    return status, auth, signed


def _pem_to_der(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("name", "alg", "prefer_pss", "mechanism"),
    [
        ("pkcs1", "rsa2048", False, "sha256_rsa"),
        ("pss", "rsa2048", True, "rsassa_pss"),
        ("ecdsa", "p256", False, "sha256_ecdsa"),
    ],
)
def test_pyhanko_csc_signer_signs_and_validates(
    server: LiveServer, name: str, alg: str, prefer_pss: bool, mechanism: str
) -> None:
    # One user per case: a TOTP time step is accepted once per user (rule 6). The server's
    # default policy asks every authorization for one; --otp-per-signature keys too.
    enrollment = enroll_user(server, f"pdf-{name}", PASSWORD, alg=alg,
                             otp_per_signature=name == "pss")
    status, auth, signed = asyncio.run(sign_and_validate(server, enrollment, prefer_pss=prefer_pss))

    assert auth.authorizations == 1
    assert status.intact, status.pretty_print_details()
    assert status.valid, status.pretty_print_details()
    assert status.trusted, status.pretty_print_details()
    assert status.bottom_line, status.pretty_print_details()
    assert status.md_algorithm == "sha256"
    assert status.pkcs7_signature_mechanism == mechanism
    # The signing certificate is the 9C certificate the server issued to this user.
    assert status.signing_cert.subject.human_friendly.find(enrollment["user"]) >= 0
    assert signed.startswith(b"%PDF")


def test_signhash_refuses_a_replayed_sad(server: LiveServer) -> None:
    """A SAD spent by signHash cannot be spent again (rule 4), seen through the v1 API."""
    enrollment = enroll_user(server, "pdf-replay", PASSWORD, alg="p256")
    token = csc_login(server, "pdf-replay")
    cred = credential_for(enrollment, "9c")
    digest = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80="  # 32 bytes
    headers = {"Authorization": f"Bearer {token}"}
    otp = pyotp.parse_uri(enrollment["otp_uri"]).now()
    auth = server.http.post(
        "/csc/v1/credentials/authorize",
        json={"credentialID": cred, "numSignatures": 1, "hash": [digest], "PIN": enrollment["pin"],
              "OTP": otp},
        headers=headers,
    )
    assert auth.status_code == 200, auth.text
    body = {
        "credentialID": cred,
        "SAD": auth.json()["SAD"],
        "hash": [digest],
        "hashAlgo": "2.16.840.1.101.3.4.2.1",
        "signAlgo": "1.2.840.10045.4.3.2",
    }
    first = server.http.post("/csc/v1/signatures/signHash", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert len(first.json()["signatures"]) == 1
    again = server.http.post("/csc/v1/signatures/signHash", json=body, headers=headers)
    assert again.status_code == 400, again.text
    assert set(again.json()) >= {"error", "error_description"}
