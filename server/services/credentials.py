# SPDX-License-Identifier: Apache-2.0
"""A user's credentials: one HSM key per PIV slot, with its certificate and policy. Whether a
key may be used is decided in :mod:`server.services.keyuse`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.hsm import KeyAlg, KeyRef
from server.models import Credential, User

ACTIVE, REVOKED = "active", "revoked"


def list_for_user(session: Session, user_id: int, *, only_active: bool = True) -> list[Credential]:
    """The user's credentials ordered by slot."""
    q = select(Credential).where(Credential.user_id == user_id).order_by(Credential.slot)
    if only_active:
        q = q.where(Credential.status == ACTIVE)
    return list(session.scalars(q))


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
