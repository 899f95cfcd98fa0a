# SPDX-License-Identifier: Apache-2.0
"""The one place that decides whether a credential's key may be used (DESIGN.md rule 2), for
every path that uses keys: CSC signing, the PIV operations under ``/api/v1``, any future one.

- :func:`key_use`: the caller's own credential, active, its owner enabled (one statement);
- :func:`require_op`: what each slot's key may do (rule 3: no key is both a signing and a
  decryption oracle);
- :func:`refuse_blocked_pin`: a blocked PIN stops every key use at once;
- :func:`otp_required` / :func:`check_otp`: the one-time password policy of each path: a
  fresh TOTP for every CSC authorization (``Policy.csc_authorize_otp``: CSC logins take the
  password alone), and for every use of a key enrolled ``--otp-per-signature`` on any path;
- :func:`spend_decryption`: the decryption budget of a key for one login (what a padding
  oracle attack needs is thousands of queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Final, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.orm import Session

from server import observe
from server.config import Policy
from server.db import runner
from server.errors import DecryptionBudgetExhausted, Forbidden, InvalidOtp, NotFound, PinBlocked
from server.hsm import KeyAlg, KeyRef
from server.models import Credential, DecryptBudget, User
from server.services import otp
from server.services.budgets import WindowedBudget
from server.services.credentials import ACTIVE


class KeyOp(StrEnum):
    """The uses of a key: CSC ``signHash`` and the PIV operations under
    ``/api/v1/credentials/{id}/…`` (SP 800-73-4 Pt 2 §3.2.4)."""

    SIGN_HASH = "sign-hash"
    RSA_RAW = "rsa-raw"
    ECDSA = "ecdsa"
    EDDSA = "eddsa"
    ECDH = "ecdh"
    DECRYPT = "decrypt"


SIGNING: Final = frozenset({KeyOp.SIGN_HASH, KeyOp.RSA_RAW, KeyOp.ECDSA, KeyOp.EDDSA})
"""The operations that make a signature."""
SLOT_OPS: Final[dict[str, frozenset[KeyOp]]] = {
    "9a": SIGNING,
    "9c": SIGNING,
    "9e": SIGNING,
    "9d": frozenset({KeyOp.DECRYPT, KeyOp.ECDH}),
}
"""What each slot's key may do: signing keys sign, the key-management key decrypts and agrees
keys (rule 3)."""


@dataclass(frozen=True)
class KeyUse:
    """A credential as a key use needs it, with its owner's PIN state."""

    id: str
    user_id: int
    owner: str
    slot: str
    key: KeyRef
    cert_pem: str | None
    pin_always: bool
    otp_per_signature: bool
    has_pin: bool
    pin_retries: int
    otp_seed: bytes | None


_CREDS = cast(Table, Credential.__table__)
_USERS = cast(Table, User.__table__)
# Built once, one statement, no ORM objects: every key use starts with it.
_KEY_USE = (
    select(
        _CREDS.c.user_id,
        _USERS.c.name,
        _CREDS.c.slot,
        _CREDS.c.alg,
        _CREDS.c.key_id,
        _CREDS.c.cert_pem,
        _CREDS.c.pin_always,
        _CREDS.c.otp_per_signature,
        _CREDS.c.status,
        _USERS.c.disabled,
        _USERS.c.pin_hash.is_not(None),
        _USERS.c.pin_retries,
        _USERS.c.otp_seed,
    )
    .join_from(_CREDS, _USERS, _USERS.c.id == _CREDS.c.user_id)
    .where(_CREDS.c.id == bindparam("credential_id"))
)


def key_use(session: Session, user_id: int, credential_id: str) -> KeyUse:
    """The caller's usable credential ``credential_id``.

    :raises NotFound: no such credential, or another user's (not told apart).
    :raises Forbidden: revoked, or its owner is disabled.
    """
    rows = runner(session)(_KEY_USE, {"credential_id": credential_id})
    if not rows or rows[0][0] != user_id:
        raise NotFound("unknown credentialID")
    (owner_id, owner, slot, alg, key_id, cert_pem, pin_always, otp_per_signature, status,
     disabled, has_pin, pin_retries, otp_seed) = rows[0]  # fmt: skip
    if status != ACTIVE or disabled:
        raise Forbidden("the credential is disabled")
    return KeyUse(
        credential_id,
        owner_id,
        owner,
        slot,
        KeyRef(key_id, KeyAlg(alg)),
        cert_pem,
        bool(pin_always),
        bool(otp_per_signature),
        bool(has_pin),
        int(pin_retries),
        otp_seed,
    )


def require_op(cred: KeyUse, op: KeyOp, count: int = 1) -> None:
    """Rule 3: refuse an operation the key's slot is not for. Every key use passes here, so
    here the request notes what it asks (``count`` operations, e.g. a signHash batch) for the
    metrics, whatever its outcome (:mod:`server.observe`).

    :raises Forbidden: e.g. a decryption with a signing key.
    """
    observe.key_use(op, cred.key.alg.value, count)
    if op not in SLOT_OPS.get(cred.slot, frozenset()):
        raise Forbidden(f"the key in slot {cred.slot.upper()} may not be used for {op}")


def refuse_blocked_pin(cred: KeyUse) -> None:
    """Rule 2: no key of a user whose PIN is blocked is used, whatever was authorized before.

    :raises PinBlocked: the owner's PIN has no tries left.
    """
    if cred.has_pin and cred.pin_retries <= 0:
        raise PinBlocked("PIN blocked")


class Via(StrEnum):
    """The paths that authorize a key use."""

    CSC = "csc"
    """CSC ``credentials/authorize``, in a session opened with the password alone."""
    PIV = "piv"
    """A PIV operation under ``/api/v1``, in a device session opened with password and TOTP."""


def otp_required(policy: Policy, cred: KeyUse, via: Via) -> bool:
    """Whether authorizing a use of the key through ``via`` needs a fresh one-time password:
    always for a credential enrolled ``--otp-per-signature`` (sole control), and on the CSC
    path unless ``policy.csc_authorize_otp`` is off (its login has no second factor)."""
    return cred.otp_per_signature or (via is Via.CSC and policy.csc_authorize_otp)


def check_otp(
    session: Session, policy: Policy, cred: KeyUse, code: str | None, *, via: Via, actor: str
) -> None:
    """The one-time password policy (:func:`otp_required`) for one authorization of a key use;
    a code sent anyway is checked too (rule 6: each time step once).

    :raises InvalidOtp: missing when required, wrong or reused.
    :raises RateLimited: too many failures of the owner.
    """
    if code is None:
        if otp_required(policy, cred, via):
            raise InvalidOtp("this authorization needs a fresh one-time password")
        return
    owner = otp.Owner(cred.user_id, cred.owner, cred.otp_seed)
    otp.verify(session, owner, code, policy, actor=actor)


_DECRYPTIONS = WindowedBudget(DecryptBudget, ("credential_id", "family_id"), "used")


def spend_decryption(session: Session, policy: Policy, cred: KeyUse, family_id: int) -> None:
    """Count one RSA decryption of ``cred``'s key for the login ``family_id`` (its refreshes
    included), in the caller's transaction; now and then, forget the expired windows.

    :raises DecryptionBudgetExhausted: ``policy.decrypt_budget`` decryptions already in the
        window (the error commits, so the refusal's audit record stays).
    """
    key = {"credential_id": cred.id, "family_id": family_id}
    window = timedelta(seconds=policy.decrypt_window)
    if not _DECRYPTIONS.spend(session, key, policy.decrypt_budget, window):
        raise DecryptionBudgetExhausted(
            f"this key did {policy.decrypt_budget} decryptions for this login within "
            f"{policy.decrypt_window} s; try again later"
        ).recorded()
