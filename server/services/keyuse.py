# SPDX-License-Identifier: Apache-2.0
"""The one place that decides whether a credential's key may be used (DESIGN.md rule 2), for
every path that uses keys: CSC signing, the PIV operations under ``/api/v1``, any future one.

- :func:`key_use`: the caller's own credential, active, its owner enabled (one statement);
- :func:`require_op`: what each slot's key may do (rule 3: no key is both a signing and a
  decryption oracle);
- :func:`refuse_blocked_pin`: a blocked PIN stops every key use at once;
- :func:`check_otp`: the credential's one-time password policy (``--otp-per-signature``:
  sole control, a fresh TOTP for every use of the signature key).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import runner
from server.errors import Forbidden, InvalidOtp, NotFound, PinBlocked
from server.hsm import KeyAlg, KeyRef
from server.models import Credential, User
from server.services import otp
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


_SIGNING: Final = frozenset({KeyOp.SIGN_HASH, KeyOp.RSA_RAW, KeyOp.ECDSA, KeyOp.EDDSA})
SLOT_OPS: Final[dict[str, frozenset[KeyOp]]] = {
    "9a": _SIGNING,
    "9c": _SIGNING,
    "9e": _SIGNING,
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


def require_op(cred: KeyUse, op: KeyOp) -> None:
    """Rule 3: refuse an operation the key's slot is not for.

    :raises Forbidden: e.g. a decryption with a signing key.
    """
    if op not in SLOT_OPS.get(cred.slot, frozenset()):
        raise Forbidden(f"the key in slot {cred.slot.upper()} may not be used for {op}")


def refuse_blocked_pin(cred: KeyUse) -> None:
    """Rule 2: no key of a user whose PIN is blocked is used, whatever was authorized before.

    :raises PinBlocked: the owner's PIN has no tries left.
    """
    if cred.has_pin and cred.pin_retries <= 0:
        raise PinBlocked("PIN blocked")


def check_otp(
    session: Session, policy: Policy, cred: KeyUse, code: str | None, *, actor: str
) -> None:
    """The credential's one-time password policy for one authorization of its key: with
    ``otp_per_signature`` a fresh TOTP is required (rule 6: each time step once); a code sent
    anyway is checked too.

    :raises InvalidOtp: missing when required, wrong or reused.
    :raises RateLimited: too many failures of the owner.
    """
    if code is None:
        if cred.otp_per_signature:
            raise InvalidOtp("this credential needs a one-time password for each use")
        return
    owner = otp.Owner(cred.user_id, cred.owner, cred.otp_seed)
    otp.verify(session, owner, code, policy, actor=actor)
