# SPDX-License-Identifier: Apache-2.0
"""What signatures beyond B-B need: a timestamp of the signature (B-T; RFC 3161) and the
validation data that lets it be checked without the network later (B-LT): the certificate
chain and the CA's CRL (RFC 5280 §5), with the deployment's CA as the trust anchor (ETSI
EN 319 102-1).

The deployment's own TSA and CRL are reached over the relay's connection (the pinned CA, the
server list with fail-over); another TSA (``--tsa URL``) over HTTP(S) with the system's trust
(or ``$SSL_CERT_FILE``'s).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import httpx
from asn1crypto import cms, crl, tsp
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.timestamps import TimeStamper
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathValidationError

from relay.client import ServerClient
from relay.docsign.remote import Credential, SignError

TIMESTAMP_QUERY: Final = "application/timestamp-query"
TIMESTAMP_REPLY: Final = "application/timestamp-reply"
TSA_TIMEOUT: Final = 10.0


class Level(StrEnum):
    """The baseline levels (ETSI EN 319 142-1, 319 122-1, 319 132-1 §6)."""

    B_B = "B-B"
    """The signature with its signed signing-certificate reference."""
    B_T = "B-T"
    """And a trusted timestamp of the signature value."""
    B_LT = "B-LT"
    """And the certificates and revocation data that validate both."""

    @classmethod
    def parse(cls, text: str) -> Level:
        """:raises SignError: not a level."""
        try:
            return cls(text.upper())
        except ValueError:
            choices = ", ".join(level.value for level in cls)
            raise SignError(f"unknown level {text!r} (one of {choices})") from None


class HttpTimeStamper(TimeStamper):
    """pyHanko's RFC 3161 client (the request, its nonce, the checks of the answer) over the
    relay's HTTP client.

    :param post: sends a DER ``TimeStampReq`` (RFC 3161 §3.4) and returns the DER answer.
    """

    def __init__(self, post: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self.post = post

    async def async_request_tsa_response(self, req: tsp.TimeStampReq) -> tsp.TimeStampResp:
        return tsp.TimeStampResp.load(await asyncio.to_thread(self.post, req.dump()))


def _post_to(url: str, query: bytes) -> bytes:
    """POST a timestamp query to another TSA, trusting what the system trusts (or
    ``$SSL_CERT_FILE``).

    :raises SignError: it cannot be reached, or answers no timestamp reply.
    """
    try:
        answer = httpx.post(url, content=query, headers={"Content-Type": TIMESTAMP_QUERY},
                            timeout=TSA_TIMEOUT)  # fmt: skip
    except httpx.HTTPError as e:
        raise SignError(f"the TSA {url} cannot be reached: {e}") from e
    media_type = answer.headers.get("content-type", "").partition(";")[0]
    if answer.status_code != 200 or media_type != TIMESTAMP_REPLY:
        raise SignError(f"the TSA {url} answered {answer.status_code} {media_type or 'nothing'}")
    return answer.content


def timestamper(client: ServerClient, url: str | None) -> TimeStamper:
    """The deployment's TSA (``/tsa`` through the pinned connection), or the one at ``url``."""
    if url is None:
        return HttpTimeStamper(
            lambda query: client.fetch("POST", "/tsa", content=query, media_type=TIMESTAMP_QUERY)
        )
    return HttpTimeStamper(functools.partial(_post_to, url))


@dataclass(frozen=True)
class ValidationData:
    """The deployment CA (the trust anchor) and its current CRL, fetched from the server."""

    ca: asn1_x509.Certificate
    crls: tuple[crl.CertificateList, ...]

    @classmethod
    def fetch(cls, client: ServerClient, credential: Credential) -> ValidationData:
        """The CRL from ``/crl``; the CA is the last certificate of the credential's chain.

        :raises RelayError: the server could not be reached.
        :raises SignError: the CRL does not parse.
        """
        try:
            crls = (crl.CertificateList.load(client.fetch("GET", "/crl")),)
            crls[0].native  # noqa: B018 -- parse it all now
        except ValueError as e:
            raise SignError("the server's CRL does not parse") from e
        return cls(credential.chain[-1], crls)

    def context(self) -> ValidationContext:
        """Validation with the CA as the only trust anchor and this CRL, nothing fetched, a
        certificate without revocation data refused."""
        return ValidationContext(
            trust_roots=[self.ca],
            crls=list(self.crls),
            allow_fetching=False,
            revocation_mode="hard-fail",
        )

    async def check(
        self,
        cert: asn1_x509.Certificate,
        usage: set[str],
        extended: set[str] | None = None,
        intermediates: tuple[asn1_x509.Certificate, ...] = (),
    ) -> None:
        """Refuse to embed data for a certificate that does not validate now (revoked, or not
        issued by the CA).

        :raises SignError: it does not validate.
        """
        validator = CertificateValidator(
            cert, intermediate_certs=list(intermediates), validation_context=self.context()
        )
        try:
            await validator.async_validate_usage(usage, extended)
        except (PathBuildingError, PathValidationError) as e:
            subject = cert.subject.human_friendly
            raise SignError(f"the certificate of {subject} does not validate: {e}") from e

    async def check_signer(self, credential: Credential) -> None:
        """Refuse to make a long-term signature with a certificate that does not validate now
        (revoked since the card was enrolled).

        :raises SignError: it does not validate.
        """
        await self.check(
            credential.certificate, {"non_repudiation"}, intermediates=credential.chain[1:]
        )

    async def check_timestamp(self, token: cms.ContentInfo) -> list[asn1_x509.Certificate]:
        """The certificates in a timestamp token, once its TSA's validates now.

        :raises SignError: the TSA's certificate does not validate.
        """
        certs = [c.chosen for c in token["content"]["certificates"]]
        for cert in certs:
            usage = cert.extended_key_usage_value
            if usage is not None and "time_stamping" in usage.native:
                await self.check(cert, set(), {"time_stamping"})
        return certs
