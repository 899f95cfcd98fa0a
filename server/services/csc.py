# SPDX-License-Identifier: Apache-2.0
"""CSC signing: credentials/list and info, credentials/authorize, extendTransaction and
signatures/signHash (csc-api.md; CSC v2 §11.4-§11.10). v1 and v2 field names are normalised by
the schemas; this module sees one shape. Whether a key may be used is decided by
:mod:`server.services.keyuse`, as for every other path.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy.orm import Session

from server.algorithms import (
    CSC_HASHES,
    HashAlg,
    KeyAlg,
    Scheme,
    check_digest_length,
    csc_hash_for_length,
    hash_by_oid,
    key_algos,
    max_pss_salt_length,
    parse_pss_params,
    sign_algo,
)
from server.config import Policy
from server.errors import InvalidRequest, NotFound
from server.hsm import Hsm
from server.models import Credential
from server.services import audit, credentials, keyuse, pins, sad, users
from server.services.keyuse import KeyOp, KeyUse, Via
from server.services.tokens import Principal

CSC_SLOTS: Final = frozenset({"9c"})
"""Slots offered through the CSC API: the digital signature key (SP 800-73-4 Pt 1 §3.1.2).
Keys with no signHash algorithm (Ed25519, csc-api.md §5 rule 4) are not offered."""


@dataclass(frozen=True)
class Factors:
    """The user factors of credentials/authorize: v1 ``PIN``/``OTP`` or v2 ``authData``."""

    pin: str | None
    otp: str | None

    @classmethod
    def from_request(
        cls, pin: str | None, otp_code: str | None, auth_data: Sequence[tuple[str, str]]
    ) -> Factors:
        """Merge the v1 and v2 forms; an ``authData`` id other than PIN or OTP is refused."""
        for ident, value in auth_data:
            match ident.upper():
                case "PIN":
                    pin = value
                case "OTP":
                    otp_code = value
                case _:
                    raise InvalidRequest(f"Invalid parameter authData: unknown id {ident!r}")
        return cls(pin, otp_code)


def _user_id(principal: Principal) -> int:
    if principal.user_id is None:
        raise NotFound("unknown credentialID")
    return principal.user_id


def offered(slot: str, alg: KeyAlg) -> bool:
    """Whether a key in ``slot`` of type ``alg`` is offered through the CSC API."""
    return slot in CSC_SLOTS and bool(key_algos(alg))


def list_credentials(session: Session, principal: Principal) -> list[Credential]:
    """The caller's own active credentials offered through the CSC API (never anyone else's)."""
    return [
        c
        for c in credentials.list_for_user(session, _user_id(principal))
        if offered(c.slot, KeyAlg(c.alg))
    ]


def credential(session: Session, principal: Principal, credential_id: str) -> KeyUse:
    """The caller's active CSC credential ``credential_id``.

    :raises NotFound: unknown, another user's, or not offered by CSC (not told apart).
    :raises Forbidden: revoked, or its owner is disabled.
    """
    cred = keyuse.key_use(session, _user_id(principal), credential_id)
    if not offered(cred.slot, cred.key.alg):
        raise NotFound("unknown credentialID")
    return cred


def _digest_alg(hashes: Sequence[bytes], hash_oid: str | None) -> HashAlg:
    """The digest algorithm of ``hashes``: named by OID, or inferred from their length."""
    if hash_oid is not None:
        hash_alg = hash_by_oid(hash_oid)
    else:
        hash_alg = csc_hash_for_length(len(hashes[0]))
    if hash_alg.name not in CSC_HASHES:
        raise InvalidRequest(f"Unsupported hash algorithm {hash_alg.name}")
    for digest in hashes:
        check_digest_length(digest, hash_alg)
    return hash_alg


def authorize(
    session: Session,
    policy: Policy,
    principal: Principal,
    *,
    credential_id: str,
    num_signatures: int,
    hashes: Sequence[bytes] | None,
    hash_oid: str | None,
    factors: Factors,
) -> sad.SadGrant:
    """credentials/authorize: check the PIN and the one-time password (by default a fresh TOTP
    is needed, :func:`keyuse.otp_required`), then issue a SAD pinned to ``hashes`` (SCAL 2), one
    authorization for the whole batch. Without a hash OID the digest algorithm is inferred from
    the digest length and enforced at signHash.

    :raises InvalidRequest: no hashes, bad digest lengths, missing PIN.
    :raises PinIncorrect, PinBlocked, InvalidOtp, RateLimited: from the factor checks.
    """
    cred = credential(session, principal, credential_id)
    if not hashes:
        raise InvalidRequest("Missing parameter hashes (the credential pins hashes, SCAL 2)")
    hash_alg = _digest_alg(hashes, hash_oid)
    if factors.pin is None:
        raise InvalidRequest("Missing parameter PIN")
    pins.verify(session, users.get_by_id(session, cred.user_id), factors.pin, policy,
                actor=principal.actor)  # fmt: skip
    keyuse.check_otp(session, policy, cred, factors.otp, via=Via.CSC, actor=principal.actor)
    return sad.authorize(
        session,
        policy,
        user_id=cred.user_id,
        credential_id=cred.id,
        num_signatures=num_signatures,
        hashes=hashes,
        hash_oid=hash_alg.oid,
        actor=principal.actor,
    )


def extend_transaction(
    session: Session,
    principal: Principal,
    *,
    credential_id: str,
    sad_value: str,
    hashes: Sequence[bytes] | None,
    hash_oid: str | None,
) -> sad.SadGrant:
    """credentials/extendTransaction: a new SAD for what the current one has left, narrowed
    to ``hashes`` (which it must have pinned) when given; never more signatures, other hashes
    or a later expiry than the authorization it descends from (:func:`sad.extend`)."""
    cred = credential(session, principal, credential_id)
    keyuse.refuse_blocked_pin(cred)
    hash_alg = _digest_alg(hashes, hash_oid) if hashes else None
    return sad.extend(
        session,
        sad_value,
        user_id=cred.user_id,
        credential_id=cred.id,
        hashes=hashes or None,
        hash_oid=hash_alg.oid if hash_alg else None,
        actor=principal.actor,
    )


@dataclass(frozen=True)
class _Plan:
    hash: HashAlg
    pss_salt_len: int | None


def _sign_plan(
    alg: KeyAlg, sign_algo_oid: str, hash_oid: str | None, params_b64: str | None
) -> _Plan:
    """Resolve signAlgo × hashAlgo (csc-api.md §5 rules 1-3) for a key of type ``alg``."""
    if sign_algo_oid not in key_algos(alg):
        raise InvalidRequest(f"signAlgo {sign_algo_oid} is not supported by this credential")
    algo = sign_algo(sign_algo_oid)
    implied, salt = algo.hash, None
    if algo.scheme is Scheme.PSS:
        if params_b64 is None:
            raise InvalidRequest("Missing parameter signAlgoParams")
        params = parse_pss_params(params_b64)
        implied, salt = params.hash, params.salt_length
        if salt > max_pss_salt_length(alg.bits, params.hash):
            raise InvalidRequest("Invalid parameter signAlgoParams: salt too long for the key")
    given = hash_by_oid(hash_oid) if hash_oid is not None else None
    if implied is not None and given is not None and given != implied:
        raise InvalidRequest("hashAlgo does not match signAlgo")
    hash_alg = implied or given
    if hash_alg is None:
        raise InvalidRequest("Missing parameter hashAlgorithmOID")
    if hash_alg.name not in CSC_HASHES:
        raise InvalidRequest(f"Unsupported hash algorithm {hash_alg.name}")
    return _Plan(hash_alg, salt)


def sign_hash(
    session: Session,
    hsm: Hsm,
    principal: Principal,
    *,
    credential_id: str,
    sad_value: str,
    hashes: Sequence[bytes],
    hash_oid: str | None,
    sign_algo_oid: str,
    sign_algo_params: str | None,
    origin: audit.Origin,
) -> list[bytes]:
    """signatures/signHash: check the SAD covers ``hashes``, sign each digest in the HSM, then
    spend the SAD and audit the signatures in the request's transaction; the signatures come
    back in input order (RSA raw, ECDSA DER). The audit record names the SAD, the digests and
    ``origin`` (node and request id).

    The HSM signs before anything is written: when it fails nothing is spent and nothing is
    audited, and of two concurrent spends of one SAD the loser's signatures are discarded.

    :raises SadInvalid: replayed, expired, another user's, or a hash it does not cover.
    :raises InvalidRequest: unsupported or inconsistent algorithms, bad digest lengths.
    :raises PinBlocked: the owner's PIN was blocked after the SAD was issued.
    """
    cred = credential(session, principal, credential_id)
    keyuse.require_op(cred, KeyOp.SIGN_HASH)
    keyuse.refuse_blocked_pin(cred)
    plan = _sign_plan(cred.key.alg, sign_algo_oid, hash_oid, sign_algo_params)
    for digest in hashes:
        check_digest_length(digest, plan.hash)
    spending = sad.check(
        session,
        sad_value,
        user_id=cred.user_id,
        credential_id=cred.id,
        hashes=hashes,
        hash_oid=plan.hash.oid,
    )
    signatures = [
        hsm.sign_digest(cred.key, digest, plan.hash.name, pss_salt_len=plan.pss_salt_len)
        for digest in hashes
    ]
    sad_id = sad.spend(session, spending)
    audit.append(
        session,
        actor=principal.actor,
        event=audit.Event.SIGN,
        subject=f"credential:{cred.id}",
        details={
            "count": len(hashes),
            "hash_oid": plan.hash.oid,
            "sad": sad_id,
            "digests": [base64.b64encode(d).decode() for d in hashes],
            **origin.details(),
        },
    )
    return signatures
