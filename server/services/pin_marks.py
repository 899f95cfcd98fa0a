# SPDX-License-Identifier: Apache-2.0
"""PIV PIN marks: the server's record that a login session verified the PIN, like a card's
security status (SP 800-73-4 Pt 1 §3.5, PIN policy).

A successful VERIFY marks the session twice: ``piv-pin`` (the PIN was verified in this card
session: 9A and 9D keys) and ``piv-pin-once`` (a one-shot mark that the next use of a
PIN-always key, 9C, spends atomically). The marks are rows of ``auth_tokens`` whose parent is the
session's refresh token, so every server node shares them, they die with the session (logout
and refresh revoke children) and they never carry a usable token value.
"""

from __future__ import annotations

from typing import Final, cast

from sqlalchemy import Table, bindparam, exists, select, update
from sqlalchemy.orm import Session

from server.db import runner
from server.errors import PinRequired
from server.models import AuthToken, utcnow
from server.services.hashing import new_token, token_digest

PIN_MARK: Final = "piv-pin"
PIN_ONCE_MARK: Final = "piv-pin-once"
_KINDS: Final = (PIN_MARK, PIN_ONCE_MARK)

_T = cast(Table, AuthToken.__table__)
_ONCE = _T.alias("once")


def _live(table: Table, kind: str) -> list[object]:
    return [
        table.c.parent_id == bindparam("session_id"),
        table.c.kind == kind,
        table.c.revoked.is_(False),
        table.c.expires_at > bindparam("now"),
    ]


# Built once: every PIV key use runs one of these two.
_VERIFIED = select(exists().where(*_live(_T, PIN_MARK)))  # type: ignore[arg-type]
_SPEND_ONCE = (
    update(_T)
    .where(
        _T.c.id
        == select(_ONCE.c.id).where(*_live(_ONCE, PIN_ONCE_MARK)).limit(1).scalar_subquery(),  # type: ignore[arg-type]
        _T.c.revoked.is_(False),
    )
    .values(revoked=True)
    .returning(_T.c.id)
)


def verified(session: Session, session_id: int) -> bool:
    """Whether login session ``session_id`` holds a PIN verification."""
    rows = runner(session)(_VERIFIED, {"session_id": session_id, "now": utcnow()})
    return bool(rows and rows[0][0])


def require(session: Session, session_id: int, *, always: bool) -> None:
    """Rule 2's PIN state for one key use: the session verified the PIN, and for a PIN-always
    key (``always``) its one-shot mark is spent now, in the caller's transaction.

    :raises PinRequired: no verification (or none since the last PIN-always use).
    """
    params = {"session_id": session_id, "now": utcnow()}
    if always:
        if not runner(session)(_SPEND_ONCE, params):
            raise PinRequired("this key needs the PIN verified immediately before each use")
    elif not verified(session, session_id):
        raise PinRequired("this key needs the PIN verified in this session")


def mark(session: Session, root: AuthToken) -> None:
    """Record a PIN verification of the login session whose refresh token is ``root`` (after
    clearing its marks); the marks live as long as it and belong to its family."""
    clear_session(session, root.id)
    for kind in _KINDS:
        session.add(
            AuthToken(
                token_hash=token_digest(new_token()),
                kind=kind,
                user_id=root.user_id,
                parent_id=root.id,
                family_id=root.family_id,
                expires_at=root.expires_at,
            )
        )


def clear_session(session: Session, session_id: int) -> None:
    """Forget login session ``session_id``'s PIN verification (a wrong PIN, a card reset)."""
    session.execute(
        update(AuthToken)
        .where(
            AuthToken.parent_id == session_id,
            AuthToken.kind.in_(_KINDS),
            AuthToken.revoked.is_(False),
        )
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )


def move(session: Session, old_session_id: int, new_session_id: int) -> None:
    """Carry the live marks of a login session over to its refreshed refresh token."""
    session.execute(
        update(AuthToken)
        .where(
            AuthToken.parent_id == old_session_id,
            AuthToken.kind.in_(_KINDS),
            AuthToken.revoked.is_(False),
        )
        .values(parent_id=new_session_id)
        .execution_options(synchronize_session=False)
    )


def clear_user(session: Session, user_id: int) -> None:
    """Forget every PIN verification of the user's sessions (the PIN was blocked, reset or
    replaced: no earlier verification may outlive it)."""
    session.execute(
        update(AuthToken)
        .where(
            AuthToken.user_id == user_id,
            AuthToken.kind.in_(_KINDS),
            AuthToken.revoked.is_(False),
        )
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )
