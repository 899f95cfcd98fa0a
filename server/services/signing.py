"""Key use: CSC credentials/authorize, extendTransaction and signHash (csc-api.md; CSC v2
§11.6, §11.9, §11.10), and the PIV operations the relay forwards from the card (raw RSA,
ECDSA, ECDH, EdDSA, RSA decryption; SP 800-73-4 Pt 2 §3.2.4 GENERAL AUTHENTICATE).

Every key use checks owner, credential state, PIN state and the credential's policy
(DESIGN.md rule 2), and is audited (rule 7). v1 and v2 field names are normalised by the
schemas; this module sees one shape.

**PIV PIN state** is kept server-side per login session, like a card's security status
(SP 800-73-4 Pt 1 §3.5, PIN policy): a successful ``pin/verify`` marks the session; 9A and 9D
keys need the mark, a 9C key whose credential has ``pin_always`` needs a fresh verification
before each use (a one-shot mark, spent atomically by the operation), 9E never needs it. A wrong
PIN clears the marks. The marks are rows of ``auth_tokens`` (kinds ``piv-pin`` and
``piv-pin-once``) whose parent is the session's refresh token, so they are shared by every
server node, die with the session (logout and refresh revoke children) and never carry a usable
token value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.orm import Session

from server import padding
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
from server.db import Direct, affected
from server.errors import (
    Forbidden,
    InvalidOtp,
    InvalidRequest,
    NotFound,
    PaddingRejected,
    PinBlocked,
    PinIncorrect,
    PinRequired,
)
from server.hsm import Hsm
from server.models import AuthToken, Credential, User, utcnow
from server.services import audit, credentials, otp, pins, sad, tokens
from server.services.hashing import new_token, token_digest
from server.services.tokens import Principal

CSC_SLOTS: Final = frozenset({"9c"})
"""Slots offered through the CSC API: the digital signature key (SP 800-73-4 Pt 1 §3.1.2).
Keys with no signHash algorithm (Ed25519, csc-api.md §5 rule 4) are not offered."""


class PivOp(StrEnum):
    """The PIV key operations under ``/api/v1/credentials/{id}/…``."""

    RSA_RAW = "rsa-raw"
    ECDSA = "ecdsa"
    EDDSA = "eddsa"
    ECDH = "ecdh"
    DECRYPT = "decrypt"


_SIGNING: Final = frozenset({PivOp.RSA_RAW, PivOp.ECDSA, PivOp.EDDSA})
SLOT_OPS: Final[dict[str, frozenset[PivOp]]] = {
    "9a": _SIGNING,
    "9c": _SIGNING,
    "9e": _SIGNING,
    "9d": frozenset({PivOp.DECRYPT, PivOp.ECDH}),
}
"""What each slot's key may do: signing keys sign, the key-management key decrypts and agrees
keys (rule 3: no key is both a signing and a decryption oracle)."""

PIN_MARK, PIN_ONCE_MARK = "piv-pin", "piv-pin-once"
REFUSED_EVENT = "key.refused"
"""Audit event of a key use refused by rule 3 or the PIN policy."""


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
        raise Forbidden("this operation needs a user's access token")
    return principal.user_id


def _user(session: Session, principal: Principal) -> User:
    user = session.get(User, _user_id(principal))
    if user is None or user.disabled:
        raise Forbidden("the user is disabled")
    return user


def _refuse_blocked_pin(has_pin: bool, pin_retries: int) -> None:
    if has_pin and pin_retries <= 0:
        raise PinBlocked("PIN blocked")


# --- CSC -------------------------------------------------------------------------------------


def csc_credentials(session: Session, principal: Principal) -> list[Credential]:
    """The caller's own active credentials offered through the CSC API (never anyone else's)."""
    return [c for c in credentials.list_for_user(session, _user_id(principal)) if _is_csc(c)]


def _is_csc(cred: Credential) -> bool:
    return _offered_by_csc(cred.slot, KeyAlg(cred.alg))


def _offered_by_csc(slot: str, alg: KeyAlg) -> bool:
    return slot in CSC_SLOTS and bool(key_algos(alg))


def csc_credential(session: Session, principal: Principal, credential_id: str) -> Credential:
    """The caller's active CSC credential ``credential_id``.

    :raises NotFound: unknown, another user's, or not offered by CSC (not told apart).
    :raises Forbidden: revoked, or its owner is disabled.
    """
    cred = credentials.get_for_user(session, _user_id(principal), credential_id)
    if not _is_csc(cred):
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


def _check_factors(
    session: Session, policy: Policy, user: User, cred: Credential, factors: Factors, actor: str
) -> None:
    if factors.pin is None:
        raise InvalidRequest("Missing parameter PIN")
    if cred.otp_per_signature and factors.otp is None:
        raise InvalidOtp("Missing parameter OTP")
    pins.verify(session, user, factors.pin, policy, actor=actor)
    if factors.otp is not None:
        otp.verify(session, user, factors.otp, policy, actor=actor)


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
    """credentials/authorize: check PIN (and OTP when the credential's policy asks for it; an
    OTP sent anyway is checked too) and issue a SAD pinned to ``hashes`` (SCAL 2). Without a
    hash OID the digest algorithm is inferred from the digest length and enforced at signHash.

    :raises InvalidRequest: no hashes, bad digest lengths, missing PIN.
    :raises PinIncorrect, PinBlocked, InvalidOtp, RateLimited: from the factor checks.
    """
    cred = csc_credential(session, principal, credential_id)
    if not hashes:
        raise InvalidRequest("Missing parameter hashes (the credential pins hashes, SCAL 2)")
    hash_alg = _digest_alg(hashes, hash_oid)
    _check_factors(session, policy, cred.user, cred, factors, principal.actor)
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
    policy: Policy,
    principal: Principal,
    *,
    credential_id: str,
    sad_value: str,
    hashes: Sequence[bytes] | None,
    hash_oid: str | None,
) -> sad.SadGrant:
    """credentials/extendTransaction: a new SAD for what the current one has left, pinned to
    the new ``hashes`` when given."""
    cred = csc_credential(session, principal, credential_id)
    hash_alg = _digest_alg(hashes, hash_oid) if hashes else None
    return sad.extend(
        session,
        policy,
        sad_value,
        user_id=cred.user_id,
        credential_id=cred.id,
        hashes=hashes or None,
        hash_oid=hash_alg.oid if hash_alg else None,
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
    db: Direct,
    hsm: Hsm,
    token: str,
    *,
    credential_id: str,
    sad_value: str,
    hashes: Sequence[bytes],
    hash_oid: str | None,
    sign_algo_oid: str,
    sign_algo_params: str | None,
) -> list[bytes]:
    """signatures/signHash for the bearer of ``token``: spend the SAD for ``hashes`` and audit
    it in one transaction, then sign each digest in the HSM; the signatures come back in input
    order (RSA raw, ECDSA DER).

    The busiest path of the server, so it runs on :class:`~server.db.Direct` (seven prebuilt
    statements on the raw connection) rather than an ORM session.

    :raises Unauthorized: the token is not a live access token.
    :raises SadInvalid: replayed, expired, another user's, or a hash it does not cover.
    :raises InvalidRequest: unsupported or inconsistent algorithms, bad digest lengths.
    :raises PinBlocked: the owner's PIN was blocked after the SAD was issued.
    """
    try:
        principal = tokens.authenticate(db, token)
        cred = credentials.key_use_for_user(db, _user_id(principal), credential_id)
        if not _offered_by_csc(cred.slot, cred.key.alg):
            raise NotFound("unknown credentialID")
        _refuse_blocked_pin(cred.has_pin, cred.pin_retries)
        plan = _sign_plan(cred.key.alg, sign_algo_oid, hash_oid, sign_algo_params)
        for digest in hashes:
            check_digest_length(digest, plan.hash)
        sad.spend(
            db,
            sad_value,
            user_id=cred.user_id,
            credential_id=cred.id,
            hashes=hashes,
            hash_oid=plan.hash.oid,
            actor=principal.actor,
        )
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return [
        hsm.sign_digest(cred.key, digest, plan.hash.name, pss_salt_len=plan.pss_salt_len)
        for digest in hashes
    ]


# --- PIV PIN state -----------------------------------------------------------------------------


def _session_root(session: Session, principal: Principal) -> AuthToken:
    """The login session of an access token: its refresh token (or itself without one)."""
    token = session.get(AuthToken, principal.token_id)
    if token is None:
        raise Forbidden("unknown session")
    root = session.get(AuthToken, token.parent_id) if token.parent_id is not None else None
    return root or token


def _require_second_factor(principal: Principal) -> None:
    if not principal.second_factor:
        raise Forbidden("PIV operations need a login with password and one-time password")


def _clear_marks(session: Session, root: AuthToken) -> None:
    session.execute(
        update(AuthToken)
        .where(
            AuthToken.parent_id == root.id,
            AuthToken.kind.in_((PIN_MARK, PIN_ONCE_MARK)),
            AuthToken.revoked.is_(False),
        )
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )


def _live_mark(root: AuthToken, kind: str) -> list[ColumnElement[bool]]:
    return [
        AuthToken.parent_id == root.id,
        AuthToken.kind == kind,
        AuthToken.revoked.is_(False),
        AuthToken.expires_at > utcnow(),
    ]


def piv_user(session: Session, principal: Principal) -> User:
    """The enabled user behind a session opened with password and TOTP."""
    _require_second_factor(principal)
    return _user(session, principal)


def pin_verified(session: Session, principal: Principal) -> bool:
    """Whether this session holds a PIN verification."""
    root = _session_root(session, principal)
    return bool(session.scalar(select(exists().where(*_live_mark(root, PIN_MARK)))))


def verify_pin(session: Session, policy: Policy, principal: Principal, pin: str) -> None:
    """VERIFY (SP 800-73-4 Pt 2 §3.2.1): check the PIN with the server-side counter and mark
    the session; a wrong PIN clears the session's marks.

    :raises PinIncorrect: with the retries left. :raises PinBlocked: no tries left.
    """
    user = piv_user(session, principal)
    root = _session_root(session, principal)
    try:
        pins.verify(session, user, pin, policy, actor=principal.actor)
    except (PinIncorrect, PinBlocked):
        _clear_marks(session, root)
        session.commit()
        raise
    _clear_marks(session, root)
    for kind in (PIN_MARK, PIN_ONCE_MARK):
        session.add(
            AuthToken(
                token_hash=token_digest(new_token()),
                kind=kind,
                user_id=user.id,
                parent_id=root.id,
                expires_at=root.expires_at,
            )
        )
    session.commit()


def reset_pin_state(session: Session, principal: Principal) -> None:
    """Forget the session's PIN verification (the card was reset or powered off)."""
    _clear_marks(session, _session_root(session, principal))
    session.commit()


def end_session(session: Session, principal: Principal) -> None:
    """Log out: revoke the session's refresh token, its access tokens and its PIN marks."""
    tokens.revoke_family(session, _session_root(session, principal).id)
    audit.append(
        session, actor=principal.actor, event=audit.Event.LOGOUT, subject=principal.actor
    )
    session.commit()


def _require_pin(session: Session, principal: Principal, cred: Credential) -> None:
    """The PIN policy of ``cred``'s slot; a one-shot mark is spent in the caller's transaction."""
    if cred.slot == "9e":
        return
    root = _session_root(session, principal)
    if cred.pin_always:
        once = session.scalar(select(AuthToken.id).where(*_live_mark(root, PIN_ONCE_MARK)))
        spent = once is not None and affected(
            session.execute(
                update(AuthToken)
                .where(AuthToken.id == once, AuthToken.revoked.is_(False))
                .values(revoked=True)
                .execution_options(synchronize_session=False)
            )
        )
        if not spent:
            raise PinRequired("this key needs the PIN verified immediately before each use")
    elif not pin_verified(session, principal):
        raise PinRequired("this key needs the PIN verified in this session")


# --- PIV key operations ------------------------------------------------------------------------


def piv_credential(
    session: Session, principal: Principal, credential_id: str, op: PivOp
) -> Credential:
    """The caller's credential for ``op``, after the owner, state and slot checks."""
    _require_second_factor(principal)
    cred = credentials.get_for_user(session, _user_id(principal), credential_id)
    if op not in SLOT_OPS.get(cred.slot, frozenset()):
        raise Forbidden(f"the key in slot {cred.slot.upper()} may not be used for {op}")
    _refuse_blocked_pin(cred.user.pin_hash is not None, cred.user.pin_retries)
    return cred


def piv_operation(
    session: Session, hsm: Hsm, principal: Principal, credential_id: str, op: PivOp, data: bytes
) -> bytes:
    """Run one PIV key operation (GENERAL AUTHENTICATE, SP 800-73-4 Pt 2 §3.2.4).

    - ``rsa-raw``: ``data`` is a padded block; rule 3 accepts only EMSA-PKCS1-v1_5 with a
      known DigestInfo or a structurally valid EMSA-PSS encoding.
    - ``decrypt`` (9D only): raw RSA decryption whose result must be a type-2 block; the
      whole block is returned, as the card does.
    - ``ecdsa``: ``data`` is the digest, as long as the curve's field; DER signature out.
    - ``eddsa``: ``data`` is the whole message (RFC 8032).
    - ``ecdh`` (9D only): ``data`` is the peer's uncompressed point; the shared secret out.

    :raises PaddingRejected: a block rule 3 refuses. :raises PinRequired: PIN policy unmet.
    Both refusals are audited (``key.refused``): they are what probing for an oracle or
    using a key without its PIN looks like.
    """
    cred = piv_credential(session, principal, credential_id, op)
    try:
        result, event, details = _run(session, hsm, principal, cred, op, data)
    except (PaddingRejected, PinRequired) as e:
        session.rollback()
        audit.log(
            session,
            actor=principal.actor,
            event=REFUSED_EVENT,
            subject=f"credential:{cred.id}",
            details={"slot": cred.slot, "op": str(op), "reason": e.code},
        )
        raise
    audit.append(
        session,
        actor=principal.actor,
        event=event,
        subject=f"credential:{cred.id}",
        details={"slot": cred.slot, "op": str(op), **details},
    )
    session.commit()
    return result


def _run(
    session: Session, hsm: Hsm, principal: Principal, cred: Credential, op: PivOp, data: bytes
) -> tuple[bytes, audit.Event, dict[str, str]]:
    ref = credentials.key_ref(cred)
    if op in (PivOp.RSA_RAW, PivOp.DECRYPT) and not ref.alg.is_rsa:
        raise InvalidRequest(f"{op} needs an RSA key")
    if op is PivOp.RSA_RAW:
        block = padding.check_signing_block(data, (ref.alg.bits + 7) // 8)
        _require_pin(session, principal, cred)
        details = {"scheme": str(block.scheme), "hash": block.hash.name}
        return hsm.rsa_raw(ref, data), audit.Event.SIGN, details
    if op is PivOp.DECRYPT:
        _require_pin(session, principal, cred)
        result = hsm.rsa_decrypt_raw(ref, data)
        padding.check_decrypted_block(result)
        return result, audit.Event.DECRYPT, {}
    if op is PivOp.ECDSA:
        if ref.alg.curve_oid is None or len(data) != (ref.alg.bits + 7) // 8:
            raise InvalidRequest("ECDSA needs an EC key and a digest as long as its field")
        _require_pin(session, principal, cred)
        hash_name = csc_hash_for_length(len(data)).name
        return hsm.sign_digest(ref, data, hash_name), audit.Event.SIGN, {}
    _require_pin(session, principal, cred)
    if op is PivOp.EDDSA:
        return hsm.eddsa_sign(ref, data), audit.Event.SIGN, {}
    return hsm.ecdh(ref, data), audit.Event.ECDH, {}
