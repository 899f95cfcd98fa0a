# SPDX-License-Identifier: Apache-2.0
"""PIV operations for the relay: VERIFY with server-side counters and session marks, and the
key operations behind GENERAL AUTHENTICATE (SP 800-73-4 Pt 2 §3.2.1, §3.2.4).

Every key use goes through :mod:`server.services.keyuse` (owner, state, slot, blocked PIN,
one-time password policy) and :mod:`server.services.pin_marks` (the session's PIN state), and
is audited (rule 7); refusals that look like probing (a block rule 3 refuses, a key used
without its PIN, a spent decryption budget) are audited too and the audit record is committed
with the refusal.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy.orm import Session

from server import padding
from server.algorithms import Scheme, csc_hash_for_length
from server.config import Policy
from server.db import server_keys
from server.errors import (
    DecryptionBudgetExhausted,
    InvalidRequest,
    PaddingRejected,
    PinBlocked,
    PinIncorrect,
    PinRequired,
)
from server.hsm import Hsm, conceal_timing
from server.models import AuthToken
from server.schemas import b64encode
from server.services import audit, keyuse, pin_marks, pins, tokens, users
from server.services.keyuse import KeyOp, KeyUse, Via
from server.services.tokens import Principal

REFUSED_EVENT: Final = "key.refused"
"""Audit event of a key use refused by rule 3 or the PIN policy."""
PIV_OPS: Final = frozenset({KeyOp.RSA_RAW, KeyOp.ECDSA, KeyOp.EDDSA, KeyOp.ECDH, KeyOp.DECRYPT})


def _user_id(principal: Principal) -> int:
    if principal.user_id is None:  # the pipeline lets only users through
        raise InvalidRequest("this operation needs a user")
    return principal.user_id


def verify_pin(session: Session, policy: Policy, principal: Principal, pin: str) -> None:
    """VERIFY (SP 800-73-4 Pt 2 §3.2.1): check the PIN with the server-side counter and mark
    the session; a wrong PIN clears the session's marks.

    :raises PinIncorrect: with the retries left. :raises PinBlocked: no tries left.
    """
    user = users.get_by_id(session, _user_id(principal))
    try:
        pins.verify(session, user, pin, policy, actor=principal.actor)
    except (PinIncorrect, PinBlocked):
        pin_marks.clear_session(session, principal.session_id)
        raise
    root = session.get(AuthToken, principal.session_id)
    if root is None:  # the pipeline authenticated its access token a moment ago
        raise InvalidRequest("this session has ended")
    pin_marks.mark(session, root)


def pin_verified(session: Session, principal: Principal) -> bool:
    """Whether this session holds a PIN verification."""
    return pin_marks.verified(session, principal.session_id)


def reset_pin_state(session: Session, principal: Principal) -> None:
    """Forget the session's PIN verification (the card was reset or powered off)."""
    pin_marks.clear_session(session, principal.session_id)


def end_session(session: Session, principal: Principal) -> None:
    """Log out: revoke the session's refresh token, its access tokens and its PIN marks."""
    tokens.revoke_family(session, principal.family_id)
    audit.append(session, actor=principal.actor, event=audit.Event.LOGOUT, subject=principal.actor)


def operation(
    session: Session,
    hsm: Hsm,
    policy: Policy,
    principal: Principal,
    credential_id: str,
    op: KeyOp,
    data: bytes,
    *,
    origin: audit.Origin,
    otp: str | None = None,
) -> bytes:
    """Run one PIV key operation (GENERAL AUTHENTICATE, SP 800-73-4 Pt 2 §3.2.4).

    - ``rsa-raw``: ``data`` is a padded block; rule 3 accepts only EMSA-PKCS1-v1_5 with a
      known DigestInfo or a structurally valid EMSA-PSS encoding.
    - ``decrypt`` (9D only): raw RSA decryption, within the key's decryption budget; the
      answer is always a type-2 block of modulus length (implicit rejection,
      :func:`server.padding.implicit_rejection`), which the host unpads as the card's.
    - ``ecdsa``: ``data`` is the digest, as long as the curve's field; DER signature out.
    - ``eddsa``: ``data`` is the whole message (RFC 8032).
    - ``ecdh`` (9D only): ``data`` is the peer's uncompressed point; the shared secret out.

    :param origin: node and request id, named by the audit record.
    :param otp: the fresh one-time password a credential with ``otp_per_signature`` needs.
    :raises PaddingRejected: a block rule 3 refuses. :raises PinRequired: PIN policy unmet.
    :raises InvalidOtp: the credential's OTP policy unmet.
    :raises DecryptionBudgetExhausted: too many decryptions with this key for this login.
    """
    if op not in PIV_OPS:
        raise InvalidRequest(f"{op} is not a PIV operation")
    cred = keyuse.key_use(session, _user_id(principal), credential_id)
    keyuse.require_op(cred, op)
    keyuse.refuse_blocked_pin(cred)
    details = {"slot": cred.slot, "op": str(op), **origin.details()}
    try:
        details |= _check_input(cred, op, data)
        if cred.slot != "9e":
            pin_marks.require(session, principal.session_id, always=cred.pin_always)
        keyuse.check_otp(session, policy, cred, otp, via=Via.PIV, actor=principal.actor)
        if op is KeyOp.DECRYPT:
            keyuse.spend_decryption(session, policy, cred, principal.family_id)
        result, event = _run(session, hsm, cred, op, data)
    except (PaddingRejected, PinRequired, DecryptionBudgetExhausted) as e:
        audit.append(
            session,
            actor=principal.actor,
            event=REFUSED_EVENT,
            subject=f"credential:{cred.id}",
            details={**details, "reason": e.code},
        )
        raise
    audit.append(
        session, actor=principal.actor, event=event, subject=f"credential:{cred.id}",
        details=details,
    )  # fmt: skip
    return result


def _check_input(cred: KeyUse, op: KeyOp, data: bytes) -> dict[str, str]:
    """The input checks of rule 3 and of each algorithm, before any PIN state is spent; what
    they found, for the audit record (the digest signed, so that an operator can reconcile the
    log with what a client received)."""
    alg = cred.key.alg
    if op in (KeyOp.RSA_RAW, KeyOp.DECRYPT) and not alg.is_rsa:
        raise InvalidRequest(f"{op} needs an RSA key")
    if op is KeyOp.RSA_RAW:
        block = padding.check_signing_block(data, (alg.bits + 7) // 8)
        details = {"scheme": str(block.scheme), "hash": block.hash.name}
        if block.scheme is Scheme.PKCS1V15:  # the DigestInfo's digest ends the block
            details["digest"] = b64encode(data[-block.hash.size :])
        return details
    if op is KeyOp.ECDSA:
        if alg.curve_oid is None or len(data) != (alg.bits + 7) // 8:
            raise InvalidRequest("ECDSA needs an EC key and a digest as long as its field")
        return {"digest": b64encode(data)}
    return {}


def _run(
    session: Session, hsm: Hsm, cred: KeyUse, op: KeyOp, data: bytes
) -> tuple[bytes, audit.Event]:
    if op is KeyOp.RSA_RAW:
        return hsm.rsa_raw(cred.key, data), audit.Event.SIGN
    if op is KeyOp.DECRYPT:
        conceal_timing()
        block = hsm.rsa_decrypt_raw(cred.key, data)
        kdk = server_keys(session).rejection_kdk(data)
        return padding.implicit_rejection(block, kdk), audit.Event.DECRYPT
    if op is KeyOp.ECDSA:
        return hsm.sign_digest(cred.key, data, csc_hash_for_length(len(data)).name), (
            audit.Event.SIGN
        )
    if op is KeyOp.EDDSA:
        return hsm.eddsa_sign(cred.key, data), audit.Event.SIGN
    return hsm.ecdh(cred.key, data), audit.Event.ECDH
