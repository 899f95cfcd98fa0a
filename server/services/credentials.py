# SPDX-License-Identifier: Apache-2.0
"""A user's credentials (one HSM key per PIV slot) and the checks before any key use (rule 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.orm import Session

from server.db import Runner, runner
from server.errors import Forbidden, NotFound
from server.hsm import KeyAlg, KeyRef
from server.models import Credential, User

ACTIVE, REVOKED = "active", "revoked"


def list_for_user(session: Session, user_id: int, *, only_active: bool = True) -> list[Credential]:
    """The user's credentials ordered by slot."""
    q = select(Credential).where(Credential.user_id == user_id).order_by(Credential.slot)
    if only_active:
        q = q.where(Credential.status == ACTIVE)
    return list(session.scalars(q))


def _check_usable(owner_id: int, user_id: int, status: str, owner_disabled: bool) -> None:
    """Another user's credential is not found (not told apart from a missing one)."""
    if owner_id != user_id:
        raise NotFound("unknown credentialID")
    if status != ACTIVE or owner_disabled:
        raise Forbidden("the credential is disabled")


def get_for_user(session: Session, user_id: int, credential_id: str) -> Credential:
    """The caller's usable credential ``credential_id``.

    :raises NotFound: no such credential, or another user's (not told apart).
    :raises Forbidden: revoked, or its owner is disabled.
    """
    cred = session.get(Credential, credential_id)
    if cred is None:
        raise NotFound("unknown credentialID")
    _check_usable(cred.user_id, user_id, cred.status, cred.user.disabled)
    return cred


@dataclass(frozen=True)
class KeyUse:
    """What one signature needs of a credential and of its owner's PIN state."""

    id: str
    user_id: int
    slot: str
    key: KeyRef
    has_pin: bool
    pin_retries: int


_CREDS = cast(Table, Credential.__table__)
_USERS = cast(Table, User.__table__)
# Built once, one statement, no ORM objects: every signHash starts with it.
_KEY_USE = (
    select(
        _CREDS.c.user_id,
        _CREDS.c.slot,
        _CREDS.c.alg,
        _CREDS.c.key_id,
        _CREDS.c.status,
        _USERS.c.disabled,
        _USERS.c.pin_hash.is_not(None),
        _USERS.c.pin_retries,
    )
    .join_from(_CREDS, _USERS, _USERS.c.id == _CREDS.c.user_id)
    .where(_CREDS.c.id == bindparam("credential_id"))
)


def key_use_for_user(db: Session | Runner, user_id: int, credential_id: str) -> KeyUse:
    """:func:`get_for_user` in one Core statement, for the signing path.

    :raises NotFound, Forbidden: as :func:`get_for_user`.
    """
    rows = runner(db)(_KEY_USE, {"credential_id": credential_id})
    if not rows:
        raise NotFound("unknown credentialID")
    owner_id, slot, alg, key_id, status, disabled, has_pin, pin_retries = rows[0]
    _check_usable(owner_id, user_id, status, disabled)
    return KeyUse(
        credential_id, owner_id, slot, KeyRef(key_id, KeyAlg(alg)), bool(has_pin), pin_retries
    )


def get_by_slot(session: Session, user: User, slot: str) -> Credential:
    """The user's active credential in ``slot`` (e.g. ``"9c"``).

    :raises NotFound: none.
    """
    cred = session.scalar(
        select(Credential).where(
            Credential.user_id == user.id,
            Credential.slot == slot.lower(),
            Credential.status == ACTIVE,
        )
    )
    if cred is None:
        raise NotFound(f"user {user.name!r} has no active key in slot {slot}")
    return cred


def key_ref(cred: Credential) -> KeyRef:
    """The HSM key of ``cred``."""
    return KeyRef(cred.key_id, KeyAlg(cred.alg))
