# SPDX-License-Identifier: Apache-2.0
"""``cardbridge card enroll``: this workstation becomes a device of the user.

The one-time code ``admin enroll`` printed is ``SECRET.CAPIN``: the secret redeems the
enrollment once, and CAPIN (base64url SHA-256 of the deployment's CA certificate) authenticates
the server before anything secret goes to it, as a kubeadm join token pins its cluster's CA:

1. fetch the CA certificate from the server (public; nothing is sent but the request);
2. refuse unless its SHA-256 is CAPIN;
3. from then on trust only that CA: redeem the secret over TLS verified against it, with the
   new device key's public half, and store what comes back.

A server whose TLS certificate comes from another CA never sees the code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relay.client import RelayError, ServerClient, ServerUnavailable, Timeouts
from relay.config import CARD_FILE, CardConfig, CredentialInfo, Enrolled
from relay.dpop import DeviceKey


class EnrollmentRefused(RelayError):
    """The code is malformed, or the server is not the one the code names."""


def parse_code(code: str) -> tuple[str, str]:
    """Split ``SECRET.CAPIN`` (whitespace around it is ignored).

    :raises EnrollmentRefused: not an enrollment code of this form.
    """
    secret, dot, pin = code.strip().partition(".")
    try:
        digest = base64.urlsafe_b64decode(pin + "=" * (-len(pin) % 4))
    except (binascii.Error, ValueError):
        digest = b""
    if not dot or not secret or len(digest) != 32:
        raise EnrollmentRefused(
            "not an enrollment code: it is SECRET.CAPIN as `cardbridge admin enroll` printed it"
        )
    return secret, pin


def ca_pin(ca_pem: str) -> str:
    """base64url (unpadded) SHA-256 of a PEM certificate's DER."""
    der = x509.load_pem_x509_certificate(ca_pem.encode()).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def fetch_ca(server: str, timeouts: Timeouts) -> str:
    """The CA certificate (PEM) a server offers, fetched without trusting anything yet.

    :raises ServerUnavailable: the server does not answer with a certificate.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted or sent before the pin check
    try:
        response = httpx.get(
            f"{server.rstrip('/')}/api/v1/ca",
            verify=context,
            timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
        )
        response.raise_for_status()
        x509.load_pem_x509_certificate(response.content)
    except (httpx.HTTPError, ValueError) as e:
        raise ServerUnavailable(f"{server} does not offer a CA certificate: {e}") from e
    return response.text


def _certificate_refused(error: BaseException) -> bool:
    """Whether ``error`` was caused by a TLS certificate that did not verify."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def enroll(
    servers: list[str],
    code: str,
    directory: Path,
    *,
    force: bool = False,
    timeouts: Timeouts = Timeouts(),  # noqa: B008 -- a frozen dataclass
) -> Enrolled:
    """Enroll this workstation with the first of ``servers`` and store the card in
    ``directory``.

    :raises EnrollmentRefused: a bad code, a server whose CA is not the code's, or a card
        already enrolled in ``directory`` (without ``force``).
    :raises ServerRefused: the server refused the code (used, expired, unknown).
    :raises ServerUnavailable: the server could not be reached.
    """
    if (directory / CARD_FILE).exists() and not force:
        raise EnrollmentRefused(
            f"a card is already enrolled in {directory}; use --force to replace it"
        )
    secret, pin = parse_code(code)
    ca_pem = fetch_ca(servers[0], timeouts)
    if ca_pin(ca_pem) != pin:
        raise EnrollmentRefused(
            f"{servers[0]} presents another CA than the enrollment code names "
            f"(CA SHA-256 {ca_pin(ca_pem)}, code {pin}): the code was not sent"
        )
    device = DeviceKey.generate()
    client = ServerClient(servers[:1], ca_pem, device, timeouts=timeouts)
    try:
        answer = client.call(
            "POST",
            "/api/v1/devices/enroll",
            json={"code": secret, "device_public_key": device.public_pem()},
        )
    except ServerUnavailable as e:
        if _certificate_refused(e):
            raise EnrollmentRefused(
                f"{servers[0]}'s TLS certificate is not from the CA the code names: "
                "the code was not sent"
            ) from e
        raise
    finally:
        client.close()
    body = answer.body
    if ca_pin(body["ca_certificate"]) != pin:
        raise EnrollmentRefused("the server's enrollment answer names another CA")
    config = CardConfig(
        servers=[s.rstrip("/") for s in servers],
        ca_pem=ca_pem,
        ca_pin=pin,
        user=body["user"],
        device_id=body["device_id"],
        credentials=[
            CredentialInfo(
                slot=c["slot"],
                credential_id=c["credential_id"],
                alg=c["alg"],
                certificate=c["certificate"],
                pin_always=c["pin_always"],
                otp_per_signature=c["otp_per_signature"],
            )
            for c in body["credentials"]
        ],
    )
    enrolled = Enrolled(directory, config, device)
    enrolled.save()
    return enrolled
