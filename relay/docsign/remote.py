# SPDX-License-Identifier: Apache-2.0
"""The remote signature key: CSC v2 calls (csc-api.md), through the running card's session or
a session of this command's own, and the batch that signs the digests of several documents
under one authorization.

Documents never leave the workstation: a signer hands over the digest of what it signs (CMS
signed attributes, an XML ``SignedInfo``); ``signatures/signHash`` returns the signature. One
``credentials/authorize`` (the PIN, and a fresh TOTP when the credential's policy asks for one)
pins up to ``multisign`` digests (CSC v2 §11.6: ``numSignatures`` and every hash), so a batch
of that many documents costs one authorization and one ``signHash``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.signers.pdf_cms import select_suitable_signing_md

from relay import control
from relay.client import RelayError, ServerClient

logger = logging.getLogger(__name__)

CSC_TIMEOUT: Final = 60.0
"""Seconds the running card may take over one CSC request (a batch signed in the HSM)."""


class SignError(RelayError):
    """A document, or the whole run, cannot be signed; the message says why in one line."""


class CscChannel(Protocol):
    """Makes CSC v2 requests in some user session."""

    def csc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``/csc/v2/{method}`` with ``body``; the answer's JSON.

        :raises RelayError: the server refused, or could not be reached.
        """
        ...

    def close(self) -> None:
        """End what the channel opened."""
        ...


def _answer(body: Any, method: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SignError(f"the server's answer to {method} is not a JSON object")
    return body


class CardChannel:
    """CSC requests made by the running card in its own session (control op ``csc``), so
    that its tokens never leave the card process.

    :param socket: the running card's control socket.
    """

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    @classmethod
    def find(cls, socket: Path) -> CardChannel | None:
        """The running card's channel, or None when no card runs or it has no session.

        :raises SignError: a card runs but cannot be asked.
        """
        try:
            status = control.request(socket, "status")
        except control.CardNotRunning:
            return None
        except control.ControlError as e:
            raise SignError(f"the running card: {e}") from e
        session = status.get("session")
        if not isinstance(session, dict) or not session.get("active"):
            return None
        return cls(socket)

    def csc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = control.request(
                self.socket, "csc", timeout=CSC_TIMEOUT, method=method, body=body
            )
        except control.ControlError as e:
            raise SignError(str(e)) from e
        return _answer(answer.get("body"), method)

    def close(self) -> None:
        """Nothing to end: the session is the card's."""


class OwnSession:
    """A CSC session of this command's own: ``auth/login`` with the user's password (HTTP
    Basic) and a DPoP proof of the device key, so the server binds the session to this enrolled
    device (RFC 9449); revoked by :meth:`close`.

    :raises RelayError: a wrong password, an unenrolled device, an unreachable server.
    """

    def __init__(self, client: ServerClient, user: str, password: str) -> None:
        self.client = client
        login = client.call("POST", "/csc/v2/auth/login", json={}, basic=(user, password))
        token = _answer(login.body, "auth/login").get("access_token")
        if not isinstance(token, str):
            raise SignError("the server's login answer has no access token")
        self._token = token

    def csc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.client.call("POST", f"/csc/v2/{method}", json=body, token=self._token)
        return _answer(answer.body, method)

    def close(self) -> None:
        body = {"token": self._token, "token_type_hint": "access_token"}
        try:
            self.client.call("POST", "/csc/v2/auth/revoke", json=body, token=self._token)
        except RelayError as e:  # it expires by itself
            logger.info("logout: the server did not confirm (%s)", e)


def _certificate(b64: Any) -> asn1_x509.Certificate:
    try:
        return asn1_x509.Certificate.load(base64.b64decode(str(b64), validate=True))
    except ValueError as e:
        raise SignError("the server sent a certificate that does not parse") from e


@dataclass(frozen=True)
class Credential:
    """The signing credential as ``credentials/info`` describes it."""

    id: str
    chain: tuple[asn1_x509.Certificate, ...]
    """The signing certificate, then its issuers."""
    digest: str
    """The digest algorithm the signatures use (pyHanko's choice for the key)."""
    mechanism: str
    """The signature algorithm, as asn1crypto names it (``sha256_ecdsa``, ``sha256_rsa``)."""
    multisign: int
    """Most digests one authorization may pin."""
    otp: bool = True
    """Whether an authorization needs a one-time password beside the PIN (its ``authInfo``,
    CSC v2 §11.5: an ``OTP`` object)."""

    @property
    def certificate(self) -> asn1_x509.Certificate:
        return self.chain[0]

    @property
    def is_ec(self) -> bool:
        return bool(self.certificate.public_key.algorithm == "ec")

    @property
    def signature_size(self) -> int:
        """The largest signature the key makes: RSA the modulus, ECDSA a DER SEQUENCE of two
        INTEGERs of the field size plus a sign byte each."""
        size = (int(self.certificate.public_key.bit_size) + 7) // 8
        return 2 * (size + 3) + 2 if self.is_ec else size

    @classmethod
    def describe(cls, channel: CscChannel, credential_id: str) -> Credential:
        """``credentials/info`` of ``credential_id`` with its certificate chain.

        :raises SignError: no certificate, or a key whose signature algorithm it lacks.
        :raises RelayError: from the channel.
        """
        info = channel.csc(
            "credentials/info",
            {"credentialID": credential_id, "certificates": "chain", "certInfo": False,
             "authInfo": True},
        )  # fmt: skip
        cert = info.get("cert") or {}
        chain = tuple(_certificate(c) for c in cert.get("certificates") or [])
        if not chain:
            raise SignError("the signing credential has no certificate")
        key = info.get("key") or {}
        digest = select_suitable_signing_md(chain[0].public_key)
        kind = "ecdsa" if chain[0].public_key.algorithm == "ec" else "rsa"
        mechanism = f"{digest}_{kind}"
        if algos.SignedDigestAlgorithmId(mechanism).dotted not in (key.get("algo") or []):
            raise SignError(f"the signing credential does not offer {mechanism}")
        objects = (info.get("auth") or {}).get("objects")
        otp = not isinstance(objects, list) or any(
            isinstance(o, dict) and o.get("id") == "OTP" for o in objects
        )  # without the description, as if it were needed
        return cls(
            credential_id, chain, digest, mechanism, int(info.get("multisign") or 1), otp
        )

    @property
    def sign_algo(self) -> str:
        """The CSC ``signAlgo`` OID (csc-api.md §5)."""
        return str(algos.SignedDigestAlgorithmId(self.mechanism).dotted)

    @property
    def hash_oid(self) -> str:
        return str(algos.DigestAlgorithmId(self.digest).dotted)

    def hash(self, data: bytes) -> bytes:
        """The digest of ``data`` that the key signs."""
        return hashlib.new(self.digest, data).digest()


class Batch:
    """Signs the digests of up to ``multisign`` documents with one ``credentials/authorize``
    and one ``signatures/signHash``, once every participant has handed over its digest or
    left.

    :param channel: where the CSC requests go.
    :param credential: the signing credential.
    :param pin: the PIN (PIV 9C: before every signature, so with every authorization).
    :param otp: a fresh one-time password for the authorization; None when the credential
        needs none.
    :param participants: how many documents take part (at most ``credential.multisign``).
    """

    def __init__(
        self,
        channel: CscChannel,
        credential: Credential,
        pin: str,
        otp: str | None,
        participants: int,
    ) -> None:
        if not 0 < participants <= credential.multisign:
            raise ValueError("a batch has 1 to multisign participants")
        self.channel = channel
        self.credential = credential
        self.pin = pin
        self.otp = otp
        self._open = participants
        self._waiting: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._commit: asyncio.Task[None] | None = None
        self.failure: RelayError | None = None
        """Why the authorization or the signatures failed, when they did."""

    def participant(self) -> Participant:
        """A seat for one document."""
        return Participant(self)

    def _submit(self, digest: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append((digest, future))
        self._leave()
        return future

    def _leave(self) -> None:
        self._open -= 1
        if self._open == 0 and self._waiting:
            self._commit = asyncio.get_running_loop().create_task(self._sign_all())

    async def _sign_all(self) -> None:
        digests = [d for d, _ in self._waiting]
        try:
            signatures = await asyncio.to_thread(self._sign, digests)
        except Exception as e:  # noqa: BLE001 -- every waiting document must hear of it
            failure = e if isinstance(e, RelayError) else SignError(f"{type(e).__name__}: {e}")
            self.failure = failure
            for _, future in self._waiting:
                future.set_exception(SignError(str(failure)))
            return
        for (_, future), signature in zip(self._waiting, signatures, strict=True):
            future.set_result(signature)

    def _sign(self, digests: list[bytes]) -> list[bytes]:
        """authorize, then signHash (CSC v2 §11.6, §11.10)."""
        cred = self.credential
        hashes = [base64.b64encode(d).decode() for d in digests]
        factors = [{"id": "PIN", "value": self.pin}]
        if self.otp is not None:
            factors.append({"id": "OTP", "value": self.otp})
        authorized = self.channel.csc(
            "credentials/authorize",
            {
                "credentialID": cred.id,
                "numSignatures": len(hashes),
                "hashes": hashes,
                "hashAlgorithmOID": cred.hash_oid,
                "authData": factors,
            },
        )
        signed = self.channel.csc(
            "signatures/signHash",
            {
                "credentialID": cred.id,
                "SAD": authorized.get("SAD"),
                "hashes": hashes,
                "hashAlgorithmOID": cred.hash_oid,
                "signAlgo": cred.sign_algo,
            },
        )
        signatures = signed.get("signatures")
        if not isinstance(signatures, list) or len(signatures) != len(hashes):
            raise SignError(f"the server returned no signature for each of {len(hashes)} digests")
        try:
            return [base64.b64decode(s, validate=True) for s in signatures]
        except (TypeError, ValueError) as e:
            raise SignError("the server returned a signature that is not base64") from e


class Participant:
    """One document's seat in a :class:`Batch`: it signs one digest, or leaves."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.credential = batch.credential
        self._done = False

    async def sign(self, digest: bytes) -> bytes:
        """The signature of ``digest``, once the whole batch is signed.

        :raises SignError: the batch's authorization or signatures failed.
        """
        if self._done:
            raise SignError("one signature per document")
        self._done = True
        return await self.batch._submit(digest)

    def leave(self) -> None:
        """This document will not be signed (it failed before its digest existed)."""
        if not self._done:
            self._done = True
            self.batch._leave()
