# SPDX-License-Identifier: Apache-2.0
"""Proof of possession of a device key: DPoP (RFC 9449).

A workstation's relay holds a device key registered at enrollment. Its login, its refresh and
every request it makes carry a DPoP proof: a JWT signed with that key whose header carries the
public key (``jwk``) and whose claims bind it to one request (``htm``, ``htu``), to a time
(``iat``), to the access token (``ath``), and make it single-use (``jti``). Tokens issued to a
device are bound to the key's JWK SHA-256 thumbprint (RFC 7638, ``jkt``), so a stolen token is
useless without the key, and a captured request cannot be replayed.

Why DPoP rather than mutual TLS: it survives a TLS-terminating load balancer (several server
nodes, HAProxy) without forwarding client certificates, it needs no per-device certificates
from the CA, and the proof names the request itself, so a replay is refused even on another
node (the ``jti`` is recorded in the shared database).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final, cast
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy import Table, bindparam, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.db import runner
from server.errors import InvalidDpopProof
from server.models import DpopProof, utcnow

ALGORITHMS: Final = ("ES256", "ES384", "EdDSA")
"""Asymmetric JWS algorithms accepted for proofs (RFC 9449 §4.2: never ``none`` or MACs)."""
MAX_AGE: Final = 60
"""Seconds a proof stays acceptable after its ``iat`` (RFC 9449 §11.1)."""
MAX_SKEW: Final = 10
"""Seconds a proof's ``iat`` may lie in the future (clock skew; the relay follows the
server's ``Date`` header)."""
MAX_PROOF: Final = 4096
"""Longest proof accepted (a P-384 proof is about 700 bytes)."""

_KEY_CACHE: dict[str, Any] = {}
_KEY_CACHE_MAX: Final = 4096


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> dict[str, str]:
    """The public JWK of a device key (RFC 7518 §6.2, RFC 8037 §2)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return cast(dict[str, str], json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key)))
    return cast(dict[str, str], json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key)))


_THUMBPRINT_MEMBERS: Final = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


def thumbprint(jwk: dict[str, Any]) -> str:
    """The JWK SHA-256 thumbprint (RFC 7638 §3): the required members, sorted, no spaces.

    :raises InvalidDpopProof: not a public EC or OKP key.
    """
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or "d" in jwk or not all(isinstance(jwk.get(m), str) for m in members):
        raise InvalidDpopProof("the proof's jwk is not a public EC or OKP key")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def access_token_hash(token: str) -> str:
    """``ath``: base64url SHA-256 of the access token (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def _normal_url(url: str) -> tuple[str, str, str]:
    """Scheme, host[:port] and path, as RFC 9449 §4.3 compares ``htu`` (no query, fragment)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    host = (parts.hostname or "").lower()
    port = parts.port
    netloc = host if port in (None, default) else f"{host}:{port}"
    return parts.scheme.lower(), netloc, parts.path or "/"


def _key_of(jwk: dict[str, Any], jkt: str) -> Any:
    key = _KEY_CACHE.get(jkt)
    if key is None:
        try:
            key = jwt.PyJWK.from_dict(jwk).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            raise InvalidDpopProof("the proof's jwk is not a usable key") from e
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        _KEY_CACHE[jkt] = key
    return key


def _unverified_header(proof: str) -> dict[str, Any]:
    """The proof's JOSE header, decoded but not yet trusted (RFC 7515 §5.2 steps 1-3): it names
    the key that verifies the proof. PyJWT then checks the whole JWS, this header included;
    reading the header here spares parsing the proof twice on every request."""
    encoded = proof.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (ValueError, UnicodeError) as e:
        raise InvalidDpopProof("the DPoP proof is not a JWT") from e
    if not isinstance(header, dict):
        raise InvalidDpopProof("the DPoP proof is not a JWT")
    return header


def verify_proof(
    proof: str, *, method: str, url: str, access_token: str | None = None
) -> tuple[str, str]:
    """Check a proof's form, signature and binding to this request (RFC 9449 §4.3, steps
    1-11 but the ``jti`` record); returns its key's thumbprint and its ``jti``.

    :raises InvalidDpopProof: malformed, wrongly signed, for another request, too old or too
        new, or (with ``access_token``) not bound to that token.
    """
    if len(proof) > MAX_PROOF:
        raise InvalidDpopProof("the DPoP proof is too long")
    header = _unverified_header(proof)
    jwk = header.get("jwk")
    if header.get("typ") != "dpop+jwt" or header.get("alg") not in ALGORITHMS:
        raise InvalidDpopProof("a DPoP proof has typ dpop+jwt and an asymmetric alg")
    if not isinstance(jwk, dict):
        raise InvalidDpopProof("a DPoP proof carries its public key as jwk")
    jkt = thumbprint(jwk)
    try:
        claims = jwt.decode(
            proof,
            _key_of(jwk, jkt),
            algorithms=[header["alg"]],
            options={"require": ["jti", "htm", "htu", "iat"], "verify_iat": False},
        )
    except jwt.InvalidTokenError as e:
        raise InvalidDpopProof("the DPoP proof's signature or claims are invalid") from e
    jti, htm, htu, iat = claims["jti"], claims["htm"], claims["htu"], claims["iat"]
    if not (isinstance(jti, str) and 16 <= len(jti) <= 128):
        raise InvalidDpopProof("the DPoP proof's jti is 16 to 128 characters")
    if htm != method or not isinstance(htu, str) or _normal_url(htu) != _normal_url(url):
        raise InvalidDpopProof("the DPoP proof is for another request")
    now = utcnow().timestamp()
    if not isinstance(iat, int | float) or not now - MAX_AGE <= iat <= now + MAX_SKEW:
        raise InvalidDpopProof("the DPoP proof is too old or from the future")
    if access_token is not None and claims.get("ath") != access_token_hash(access_token):
        raise InvalidDpopProof("the DPoP proof is not bound to this access token")
    return jkt, jti


_PROOFS = cast(Table, DpopProof.__table__)
_RECORD = {
    name: dialect.insert(_PROOFS)
    .values(jti_hash=bindparam("jti_hash"), expires_at=bindparam("expires_at"))
    .on_conflict_do_nothing()
    .returning(_PROOFS.c.jti_hash)
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
}
_FORGET = delete(_PROOFS).where(_PROOFS.c.expires_at < bindparam("now"))


def record(session: Session, jkt: str, jti: str) -> None:
    """Record a proof's ``jti`` for as long as the proof is acceptable (RFC 9449 §11.1), in the
    caller's transaction; now and then, forget the expired ones.

    :raises InvalidDpopProof: this proof was already used (a replayed request).
    """
    run = runner(session)
    now = utcnow()
    digest = hashlib.sha256(f"{jkt}:{jti}".encode()).hexdigest()
    expires = now + timedelta(seconds=MAX_AGE + MAX_SKEW)
    statement = _RECORD[session.get_bind().dialect.name]
    if not run(statement, {"jti_hash": digest, "expires_at": expires}):
        raise InvalidDpopProof("the DPoP proof was already used")
    if random.random() < 1 / 256:  # noqa: S311 -- housekeeping, not security
        run(_FORGET, {"now": now})


def check_proof(
    session: Session,
    proofs: Sequence[str],
    *,
    method: str,
    url: str,
    jkt: str | None,
    access_token: str | None = None,
) -> str:
    """The whole check of a request's ``DPoP`` header (RFC 9449 §4.3): exactly one proof,
    valid for this request, of the key ``jkt`` (any key when None, e.g. at login), never used
    before; returns the key's thumbprint.

    :raises InvalidDpopProof: anything else.
    """
    if len(proofs) != 1:
        raise InvalidDpopProof("exactly one DPoP proof is required")
    proof_jkt, jti = verify_proof(proofs[0], method=method, url=url, access_token=access_token)
    if jkt is not None and proof_jkt != jkt:
        raise InvalidDpopProof("the DPoP proof is signed by another key than the token's")
    record(session, proof_jkt, jti)
    return proof_jkt
