# SPDX-License-Identifier: Apache-2.0
"""Opaque bearer tokens: user access/refresh tokens and the admin token.

Tokens are 256-bit random strings; only their SHA-256 is stored. A refresh token is rotated on
use; revoking it also revokes the access tokens it produced (CSC auth/revoke semantics).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import Runner, affected, runner
from server.errors import InvalidOtp, RateLimited, Unauthorized
from server.models import AuthToken, User, utcnow
from server.services import audit, otp, users
from server.services.hashing import new_token, token_digest

ACCESS, REFRESH, ADMIN = "access", "refresh", "admin"


@dataclass(frozen=True)
class TokenPair:
    """What a login returns."""

    access_token: str
    refresh_token: str
    expires_in: int
    """Seconds until the access token expires."""


@dataclass(frozen=True)
class Principal:
    """Who a bearer token stands for."""

    kind: str
    """``"user"`` or ``"admin"``."""
    name: str
    user_id: int | None
    token_id: int
    second_factor: bool
    """The session was opened with password and TOTP (False for CSC password-only logins)."""

    @property
    def actor(self) -> str:
        """The audit log's name for this principal."""
        return "admin" if self.kind == "admin" else f"user:{self.name}"


def _store(
    session: Session,
    token: str,
    kind: str,
    *,
    user_id: int | None,
    expires_at: datetime | None,
    second_factor: bool = False,
    parent_id: int | None = None,
) -> AuthToken:
    row = AuthToken(
        token_hash=token_digest(token),
        kind=kind,
        user_id=user_id,
        expires_at=expires_at,
        second_factor=second_factor,
        parent_id=parent_id,
    )
    session.add(row)
    session.flush()
    return row


def issue_pair(session: Session, user: User, policy: Policy, *, second_factor: bool) -> TokenPair:
    """New access + refresh tokens for ``user`` (caller commits)."""
    now = utcnow()
    refresh, access = new_token(), new_token()
    parent = _store(
        session,
        refresh,
        REFRESH,
        user_id=user.id,
        expires_at=now + policy.ttl("refresh_token_ttl"),
        second_factor=second_factor,
    )
    _store(
        session,
        access,
        ACCESS,
        user_id=user.id,
        expires_at=now + policy.ttl("access_token_ttl"),
        second_factor=second_factor,
        parent_id=parent.id,
    )
    return TokenPair(access, refresh, policy.access_token_ttl)


def login(
    session: Session,
    policy: Policy,
    name: str,
    password: str,
    otp_code: str | None,
    *,
    require_otp: bool = True,
) -> TokenPair:
    """Password (+ TOTP) login; every outcome is audited.

    With ``require_otp=False`` (CSC ``auth/login``, HTTP Basic) the OTP may be omitted and the
    session has ``second_factor=False``; an OTP given anyway is still checked.

    :raises Unauthorized: bad user name or password.
    :raises InvalidOtp: missing, wrong or reused OTP.
    :raises RateLimited: too many failed passwords or OTPs of this user.
    """

    def failed(reason: str) -> None:
        audit.log(
            session,
            actor=f"user:{name}",
            event=audit.Event.LOGIN_FAILED,
            subject=f"user:{name}",
            details={"reason": reason},
        )

    try:
        user = users.authenticate_password(session, name, password, policy=policy)
    except (Unauthorized, RateLimited) as e:
        failed("password" if isinstance(e, Unauthorized) else e.code)
        raise
    if otp_code is None and require_otp:
        failed("otp missing")
        raise InvalidOtp("a one-time password is required")
    if otp_code is not None:
        try:
            otp.verify(session, user, otp_code, policy)
        except (InvalidOtp, RateLimited) as e:
            failed(e.code)
            raise
    pair = issue_pair(session, user, policy, second_factor=otp_code is not None)
    audit.append(
        session,
        actor=f"user:{name}",
        event=audit.Event.LOGIN_OK,
        subject=f"user:{name}",
        details={"second_factor": otp_code is not None},
    )
    session.commit()
    return pair


def _lookup(session: Session, token: str, kinds: tuple[str, ...]) -> AuthToken:
    row = session.scalar(select(AuthToken).where(AuthToken.token_hash == token_digest(token)))
    now = utcnow()
    if (
        row is None
        or row.kind not in kinds
        or row.revoked
        or (row.expires_at is not None and row.expires_at <= now)
    ):
        raise Unauthorized("invalid or expired token")
    return row


_TOKENS = cast(Table, AuthToken.__table__)
_PARENT = _TOKENS.alias("parent")
_USERS = cast(Table, User.__table__)
# Built once: every API request authenticates, so this is one prebuilt query.
_AUTHENTICATE = (
    select(
        _TOKENS.c.id,
        _TOKENS.c.kind,
        _TOKENS.c.revoked,
        _TOKENS.c.expires_at,
        _TOKENS.c.second_factor,
        _USERS.c.id,
        _USERS.c.name,
        _USERS.c.disabled,
        _PARENT.c.revoked,
    )
    .select_from(
        _TOKENS.outerjoin(_USERS, _USERS.c.id == _TOKENS.c.user_id).outerjoin(
            _PARENT, _PARENT.c.id == _TOKENS.c.parent_id
        )
    )
    .where(_TOKENS.c.token_hash == bindparam("digest"))
)


def authenticate(db: Session | Runner, token: str) -> Principal:
    """The principal of a bearer token (access or admin token).

    :raises Unauthorized: unknown, expired or revoked token, revoked refresh token, or a
        disabled user.
    """
    rows = runner(db)(_AUTHENTICATE, {"digest": token_digest(token)})
    if not rows:
        raise Unauthorized("invalid or expired token")
    token_id, kind, revoked, expires_at, second_factor, user_id, name, disabled, parent_revoked = (
        rows[0]
    )
    if revoked or (expires_at is not None and expires_at <= utcnow()) or parent_revoked:
        raise Unauthorized("invalid or expired token")
    if kind == ADMIN:
        return Principal("admin", "admin", None, token_id, True)
    if kind != ACCESS or user_id is None or disabled:
        raise Unauthorized("invalid or expired token")
    return Principal("user", name, user_id, token_id, bool(second_factor))


def refresh(session: Session, policy: Policy, refresh_token: str) -> TokenPair:
    """Rotate a refresh token: the old one (and its access tokens) stop working.

    :raises Unauthorized: unknown, expired, revoked or already used refresh token.
    """
    row = _lookup(session, refresh_token, (REFRESH,))
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        raise Unauthorized("invalid or expired token")
    rotated = affected(
        session.execute(
            update(AuthToken)
            .where(AuthToken.id == row.id, AuthToken.revoked.is_(False))
            .values(revoked=True)
            .execution_options(synchronize_session=False)
        )
    )
    if rotated != 1:
        session.rollback()
        raise Unauthorized("invalid or expired token")
    session.execute(
        update(AuthToken)
        .where(AuthToken.parent_id == row.id)
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )
    pair = issue_pair(session, user, policy, second_factor=row.second_factor)
    audit.append(session, actor=f"user:{user.name}", event=audit.Event.REFRESH)
    session.commit()
    return pair


def revoke_family(session: Session, token_id: int) -> None:
    """Revoke a token and the tokens it produced (access tokens, PIV PIN marks); caller commits."""
    session.execute(
        update(AuthToken)
        .where(or_(AuthToken.id == token_id, AuthToken.parent_id == token_id))
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )


def revoke(session: Session, token: str, *, owner: Principal | None = None) -> None:
    """Revoke an access or refresh token (a refresh token takes its access tokens along).

    Unknown tokens are ignored (RFC 7009 §2.2). With ``owner`` only that user's tokens are
    revoked.
    """
    row = session.scalar(select(AuthToken).where(AuthToken.token_hash == token_digest(token)))
    if row is None or row.kind == ADMIN:
        return
    if owner is not None and owner.kind == "user" and row.user_id != owner.user_id:
        return
    revoke_family(session, row.id)
    user = session.get(User, row.user_id) if row.user_id is not None else None
    audit.append(
        session,
        actor=owner.actor if owner else "system",
        event=audit.Event.LOGOUT,
        subject=f"user:{user.name}" if user else "",
        details={"kind": row.kind},
    )
    session.commit()


def create_admin_token(session: Session, *, actor: str = "system") -> str:
    """A new admin API token (no expiry); the caller stores it in a 0600 file."""
    token = new_token()
    _store(session, token, ADMIN, user_id=None, expires_at=None)
    audit.append(
        session, actor=actor, event=audit.Event.SERVER_INIT, details={"admin_token": "created"}
    )
    session.commit()
    return token
