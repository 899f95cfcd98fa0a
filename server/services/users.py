# SPDX-License-Identifier: Apache-2.0
"""The built-in user store: add, list, disable, password check (argon2id, rules 5 and 6)."""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.config import Policy
from server.errors import Conflict, InvalidRequest, NotFound, RateLimited, Unauthorized
from server.models import AuthToken, Sad, User
from server.services import audit, otp
from server.services.hashing import hash_secret, verify_secret

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 8


def validate_name(name: str) -> str:
    """``name`` if it is a valid user name (1-64 of ``A-Z a-z 0-9 . _ @ -``)."""
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest("user names are 1-64 characters of A-Z a-z 0-9 . _ @ -")
    return name


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD or len(password) > 1024:
        raise InvalidRequest(f"passwords are {MIN_PASSWORD} to 1024 characters")


def add_user(
    session: Session,
    name: str,
    *,
    password: str | None = None,
    email: str | None = None,
    upn: str | None = None,
    actor: str = "admin",
) -> User:
    """Create a user (no password means no password login).

    :raises Conflict: the name is taken.
    """
    validate_name(name)
    if password is not None:
        _check_password(password)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(
        name=name,
        email=email,
        upn=upn,
        password_hash=hash_secret(password) if password is not None else None,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as e:  # a concurrent add of the same name won the race
        raise Conflict(f"user {name!r} already exists") from e
    audit.append(
        session,
        actor=actor,
        event=audit.Event.USER_ADD,
        subject=f"user:{name}",
        details={"email": email, "upn": upn, "password": password is not None},
    )
    return user


def list_users(session: Session) -> list[User]:
    """Every user, by name."""
    return list(session.scalars(select(User).order_by(User.name)))


def get_user(session: Session, name: str) -> User:
    """The user called ``name``.

    :raises NotFound: no such user.
    """
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def get_by_id(session: Session, user_id: int) -> User:
    """The user with id ``user_id``.

    :raises NotFound: no such user.
    """
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("no such user")
    return user


def revoke_sessions(session: Session, user_id: int) -> None:
    """Revoke the user's tokens and spend their SADs (caller commits)."""
    session.execute(update(AuthToken).where(AuthToken.user_id == user_id).values(revoked=True))
    session.execute(update(Sad).where(Sad.user_id == user_id).values(remaining=0))


def disable_user(session: Session, name: str, *, actor: str = "admin") -> User:
    """Disable a user: no more logins, current tokens and SADs revoked."""
    user = get_user(session, name)
    user.disabled = True
    revoke_sessions(session, user.id)
    audit.append(session, actor=actor, event=audit.Event.USER_DISABLE, subject=f"user:{name}")
    return user


def authenticate_password(
    session: Session, name: str, password: str, *, policy: Policy
) -> User:
    """The enabled user ``name`` whose password is ``password``.

    Costs one argon2id verification, run with no write transaction open (reads take no lock),
    whatever the outcome for a name that exists or not (no user-enumeration timing). A wrong
    password of an existing user counts against the user's failure budget
    (:func:`server.services.otp.count_failure`, rule 6); while that is exhausted nothing is
    checked. The outcome takes its place among concurrent attempts when it is applied: a correct
    password is refused too if failures counted meanwhile exhausted the budget.

    :raises RateLimited: too many failed authentications of this user in the window.
    :raises Unauthorized: unknown user, disabled, no password set or wrong password.
    """
    user = session.scalar(select(User).where(User.name == name))
    if user is not None and not otp.may_fail(session, user.id, policy):
        raise RateLimited(otp.RATE_LIMITED)
    ok = verify_secret(user.password_hash if user else None, password)
    if user is None:
        raise Unauthorized("invalid user name or password")
    if not ok:
        if not otp.count_failure(session, user.id, policy):
            raise RateLimited(otp.RATE_LIMITED)
        raise Unauthorized("invalid user name or password").recorded()
    if not otp.may_fail(session, user.id, policy):
        raise RateLimited(otp.RATE_LIMITED)
    if user.disabled:
        raise Unauthorized("invalid user name or password")
    return user
