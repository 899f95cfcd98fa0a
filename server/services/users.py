# SPDX-License-Identifier: Apache-2.0
"""The built-in user store: add, list, disable, password check (argon2id, rules 5 and 6).

User names are NFKC-normalised and unique without regard to case: ``ALICE``, ``alice`` and
``ＡＬＩＣＥ`` are one name (:func:`name_key`, a unique column), however it is spelled at login.
"""

from __future__ import annotations

import re
import unicodedata

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.config import Policy
from server.errors import Conflict, InvalidRequest, NotFound, RateLimited, Unauthorized
from server.models import AuthToken, Sad, User
from server.services import audit, login_limits
from server.services.hashing import hash_secret, verify_secret

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD, MAX_PASSWORD = 8, 256
RATE_LIMITED = "too many failed logins; try again later"


def validate_name(name: str) -> str:
    """``name`` NFKC-normalised, if that is a valid user name (1-64 of
    ``A-Z a-z 0-9 . _ @ -``)."""
    name = unicodedata.normalize("NFKC", name)
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest("user names are 1-64 characters of A-Z a-z 0-9 . _ @ -")
    return name


def name_key(name: str) -> str:
    """The form under which a name is unique and found: NFKC, case-folded, NFKC again (the
    Unicode compatibility caseless match, Unicode §3.13)."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return unicodedata.normalize("NFKC", folded)


def _check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(f"passwords are {MIN_PASSWORD} to {MAX_PASSWORD} characters")


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

    :raises Conflict: the name is taken, in any case or Unicode compatibility form.
    """
    name = validate_name(name)
    if password is not None:
        _check_password(password)
    key = name_key(name)
    if session.scalar(select(User.id).where(User.name_key == key)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(
        name=name,
        name_key=key,
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
    """The user called ``name`` (in any case or Unicode compatibility form).

    :raises NotFound: no such user.
    """
    user = session.scalar(select(User).where(User.name_key == name_key(name)))
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
    session: Session, name: str, password: str, *, policy: Policy, address: str
) -> User:
    """The enabled user ``name`` whose password is ``password``, for a login from the client
    ``address``.

    Unknown names go exactly the way of known ones: the same budgets are read and counted
    (:mod:`server.services.login_limits`), one argon2id verification runs (a dummy hash for
    an unknown name) with no write transaction open, and the answers are the same. While the
    address's or the name's budget is spent, nothing is checked and the answer is 429. A
    failure counts against both; a correct password is refused too if failures counted
    meanwhile spent a budget (the outcome takes its place among concurrent attempts).

    :raises RateLimited: a budget is spent.
    :raises Unauthorized: unknown user, disabled, no password set or wrong password.
    """
    key = name_key(name)
    address = address[:64]
    if login_limits.spent(session, policy, address, key):
        raise RateLimited(RATE_LIMITED)
    user = session.scalar(select(User).where(User.name_key == key))
    ok = verify_secret(user.password_hash if user else None, password)
    if user is None or not ok:
        if not login_limits.count_failure(session, policy, address, key):
            raise RateLimited(RATE_LIMITED)
        raise Unauthorized("invalid user name or password").recorded()
    if login_limits.spent(session, policy, address, key):
        raise RateLimited(RATE_LIMITED)
    if user.disabled:
        raise Unauthorized("invalid user name or password")
    return user


def unlock(session: Session, name: str, *, actor: str = "admin") -> User:
    """Lift the failed-login budget of ``name`` (the per-user lock), audited."""
    user = get_user(session, name)
    login_limits.forget_name(session, user.name_key)
    audit.append(session, actor=actor, event=audit.Event.USER_UNLOCK, subject=f"user:{user.name}")
    return user
