# SPDX-License-Identifier: Apache-2.0
"""The device key and its DPoP proofs (RFC 9449), the relay's proof of possession.

Every request of the relay carries a proof signed by the device key: a JWT whose header holds
the public key and whose claims name the request (``htm``, ``htu``), the time (``iat``), the
access token (``ath``) and a unique ``jti``. The server binds the session's tokens to the key,
so a token stolen from this workstation's memory is useless elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Generator
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHM: Final = "ES256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class DeviceKey:
    """The workstation's P-256 device key (ES256 proofs).

    :param private_key: the key; :meth:`generate` makes a new one.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("the device key is a P-256 key")
        self._key = private_key
        self.jwk: dict[str, str] = json.loads(
            jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key())
        )
        self._header: dict[str, Any] = {"typ": "dpop+jwt", "jwk": self.jwk}

    @classmethod
    def generate(cls) -> DeviceKey:
        """A new device key."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> DeviceKey:
        """Load a PKCS#8 PEM private key.

        :raises ValueError: not a P-256 private key.
        """
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the device key is a P-256 key")
        return cls(key)

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: the caller stores it in a 0600 file."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> str:
        """The SubjectPublicKeyInfo PEM the server registers at enrollment."""
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def thumbprint(self) -> str:
        """The JWK SHA-256 thumbprint (RFC 7638) the server binds tokens to."""
        members = {k: self.jwk[k] for k in ("crv", "kty", "x", "y")}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
        return _b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(
        self, method: str, url: str, *, access_token: str | None = None, now: float | None = None
    ) -> str:
        """A DPoP proof for one request (RFC 9449 §4.2).

        :param url: the request's URL; its query and fragment are left out of ``htu``.
        :param access_token: the token the request carries (adds ``ath``).
        :param now: the time to put in ``iat`` (the server's clock, when known).
        """
        parts = urlsplit(url)
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
            "iat": int(time.time() if now is None else now),
        }
        if access_token is not None:
            claims["ath"] = _b64url(hashlib.sha256(access_token.encode("ascii")).digest())
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers=self._header)


class DpopAuth(httpx.Auth):
    """httpx authentication that sends a DPoP proof with every request, and the access token
    as ``Authorization: DPoP`` when there is one.

    :param key: the device key.
    :param token: the current access token (None for a login or refresh).
    :param clock: the time to put in proofs (e.g. local time corrected to the server's).
    """

    def __init__(
        self,
        key: DeviceKey,
        token: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.token = token
        self.clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["DPoP"] = self.key.proof(
            request.method, str(request.url), access_token=self.token, now=self.clock()
        )
        if self.token is not None:
            request.headers["Authorization"] = f"DPoP {self.token}"
        yield request
