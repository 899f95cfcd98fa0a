# SPDX-License-Identifier: Apache-2.0
"""Opaque bearer tokens: user access/refresh tokens and the admin token.

Tokens are 256-bit random strings; only their SHA-256 is stored. A refresh token is rotated on
use; revoking it also revokes the access tokens it produced (CSC auth/revoke semantics). Every
token of one login shares a family (``family_id``): a refresh token presented again after it
was rotated or revoked means that someone holds a copy, and the whole family is revoked and the
reuse audited (RFC 9700, OAuth 2.0 Security BCP, §4.14.2).
Tokens issued to an enrolled device are bound to its key (``jkt``, RFC 9449): every use then
needs a DPoP proof of that key (``server.services.dpop``, checked by the request pipeline).
Services here never commit: the request (or CLI command) that calls them owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import affected, runner
from server.errors import Forbidden, InvalidOtp, RateLimited, ServerError, Unauthorized
from server.models import AuthToken, Device, User, utcnow
from server.services import audit, otp, pin_marks, users
from server.services.hashing import new_token, token_digest

ACCESS, REFRESH, ADMIN = "access", "refresh", "admin"


@dataclass(frozen=True)
class TokenPair:
    """What a login returns."""

    access_token: str
    refresh_token: str
    expires_in: int
    """Seconds until the access token expires."""
    refresh_expires_in: int
    """Seconds until the session ends (the refresh token expires; refreshing does not extend
    it: a session lasts ``refresh_token_ttl`` from its login)."""
    session_id: int
    """The refresh token's row: the login session."""


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
    jkt: str | None = None
    """The device key this session is bound to (RFC 9449), or None for an unbound token."""
    session_id: int = 0
    """The login session: the refresh token an access token came with (itself without one);
    PIV PIN marks hang off it."""
    family_id: int = 0
    """The login this token descends from, across refresh token rotations."""

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
    family_id: int | None = None,
    jkt: str | None = None,
) -> AuthToken:
    row = AuthToken(
        token_hash=token_digest(token),
        kind=kind,
        user_id=user_id,
        expires_at=expires_at,
        second_factor=second_factor,
        parent_id=parent_id,
        family_id=family_id,
        jkt=jkt,
    )
    session.add(row)
    session.flush()
    return row


def issue_pair(
    session: Session,
    user: User,
    policy: Policy,
    *,
    second_factor: bool,
    jkt: str | None = None,
    family_id: int | None = None,
    session_expires: datetime | None = None,
) -> TokenPair:
    """New access + refresh tokens for ``user``, bound to the device key ``jkt`` if given, in
    the family ``family_id`` (a rotation) or a new one (a login).

    :param session_expires: when the session ends (a rotation keeps its login's end); by
        default ``refresh_token_ttl`` from now.
    """
    now = utcnow()
    ends = session_expires or now + policy.ttl("refresh_token_ttl")
    access_ends = min(now + policy.ttl("access_token_ttl"), ends)
    refresh, access = new_token(), new_token()
    parent = _store(
        session,
        refresh,
        REFRESH,
        user_id=user.id,
        expires_at=ends,
        second_factor=second_factor,
        family_id=family_id,
        jkt=jkt,
    )
    if family_id is None:
        parent.family_id = family_id = parent.id
    _store(
        session,
        access,
        ACCESS,
        user_id=user.id,
        expires_at=access_ends,
        second_factor=second_factor,
        parent_id=parent.id,
        family_id=family_id,
        jkt=jkt,
    )
    return TokenPair(
        access,
        refresh,
        max(0, int((access_ends - now).total_seconds())),
        max(0, int((ends - now).total_seconds())),
        parent.id,
    )


def require_device(session: Session, user: User, jkt: str) -> Device:
    """The user's enrolled, unrevoked device whose key has the thumbprint ``jkt``.

    :raises Forbidden: no such device of this user, or it was revoked (its key's holder
        learns that, and nobody else: the request proves possession of the key).
    """
    device = session.scalar(select(Device).where(Device.jkt == jkt, Device.user_id == user.id))
    if device is None:
        raise Forbidden("the DPoP key is not an enrolled device of this user")
    if device.revoked:
        raise Forbidden("this device was revoked (admin revoke); enroll it again")
    return device


def login(
    session: Session,
    policy: Policy,
    name: str,
    password: str,
    otp_code: str | None,
    *,
    address: str,
    require_otp: bool = True,
    jkt: str | None = None,
) -> TokenPair:
    """Password (+ TOTP) login from the client ``address``; every outcome is audited.

    With ``require_otp=False`` (CSC ``auth/login``, HTTP Basic) the OTP may be omitted and the
    session has ``second_factor=False``; an OTP given anyway is still checked. With ``jkt`` (the
    thumbprint of a DPoP proof's key) the key must be an enrolled device of the user and the
    tokens are bound to it.

    :raises Unauthorized: bad user name or password.
    :raises InvalidOtp: missing, wrong or reused OTP.
    :raises RateLimited: too many failed logins from this address or for this name, or too
        many wrong OTPs of this user.
    :raises Forbidden: ``jkt`` is not an enrolled device of the user.
    """

    def failed(error: ServerError, reason: str) -> ServerError:
        audit.append(
            session,
            actor=f"user:{name}",
            event=audit.Event.LOGIN_FAILED,
            subject=f"user:{name}",
            details={"reason": reason, "address": address},
        )
        return error.recorded()

    try:
        user = users.authenticate_password(session, name, password, policy=policy,
                                           address=address)
    except (Unauthorized, RateLimited) as e:
        raise failed(e, "password" if isinstance(e, Unauthorized) else e.code) from None
    if otp_code is None and require_otp:
        raise failed(InvalidOtp("a one-time password is required"), "otp missing")
    if otp_code is not None:
        try:
            otp.verify(session, user, otp_code, policy)
        except (InvalidOtp, RateLimited) as e:
            raise failed(e, e.code) from None
    if jkt is not None:
        try:
            require_device(session, user, jkt)
        except Forbidden as e:
            raise failed(e, "device") from None
    pair = issue_pair(session, user, policy, second_factor=otp_code is not None, jkt=jkt)
    audit.append(
        session,
        actor=f"user:{name}",
        event=audit.Event.LOGIN_OK,
        subject=f"user:{name}",
        details={
            "second_factor": otp_code is not None,
            "device_bound": jkt is not None,
            "address": address,
        },
    )
    return pair


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
        _TOKENS.c.jkt,
        _TOKENS.c.parent_id,
        _TOKENS.c.family_id,
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


@dataclass(frozen=True)
class _Token:
    id: int
    kind: str
    revoked: bool
    second_factor: bool
    jkt: str | None
    parent_id: int | None
    family_id: int
    user_id: int | None
    user_name: str
    expires_at: datetime | None
    usable: bool
    """Unexpired, unrevoked, its parent unrevoked, its user enabled."""


def _lookup(session: Session, token: str) -> _Token | None:
    """The stored token ``token``, live or not; None when unknown."""
    rows = runner(session)(_AUTHENTICATE, {"digest": token_digest(token)})
    if not rows:
        return None
    (token_id, kind, revoked, expires_at, second_factor, jkt, parent_id, family_id, user_id,
     name, disabled, parent_revoked) = rows[0]  # fmt: skip
    expired = expires_at is not None and expires_at <= utcnow()
    usable = not (revoked or expired or parent_revoked) and (
        kind == ADMIN or (user_id is not None and not disabled)
    )
    return _Token(token_id, kind, bool(revoked), bool(second_factor), jkt, parent_id,
                  family_id or token_id, user_id, name or "", expires_at, usable)  # fmt: skip


def _live(session: Session, token: str) -> _Token:
    """The live token ``token`` (unexpired, unrevoked, its parent unrevoked, its user enabled).

    :raises Unauthorized: anything else.
    """
    row = _lookup(session, token)
    if row is None or not row.usable:
        raise Unauthorized("invalid or expired token")
    return row


def authenticate(session: Session, token: str) -> Principal:
    """The principal of an access token or of the admin token.

    :raises Unauthorized: unknown, expired or revoked token, revoked refresh token, a refresh
        token, or a disabled user.
    """
    row = _live(session, token)
    if row.kind == ADMIN:
        return Principal("admin", "admin", None, row.id, True, session_id=row.id)
    if row.kind != ACCESS:
        raise Unauthorized("invalid or expired token")
    return Principal(
        "user",
        row.user_name,
        row.user_id,
        row.id,
        row.second_factor,
        row.jkt,
        session_id=row.parent_id or row.id,
        family_id=row.family_id,
    )


def refresh(
    session: Session, policy: Policy, refresh_token: str, *, jkt: str | None = None
) -> TokenPair:
    """Rotate a refresh token: the old one (and its access tokens) stop working; the new pair
    stays in the login's family and keeps its end and its PIV PIN verification (a refresh is not
    a card reset). A refresh token bound to a device key needs a DPoP proof of that key
    (``jkt``).

    A refresh token presented after it was rotated (or revoked) is a copy in someone else's
    hands, or the original after a copy was used first: the server cannot tell the thief from
    the owner, so the family is revoked, the owner logs in again, and the reuse is audited (RFC
    9700 §4.14.2). Two concurrent rotations of one token count as a reuse too.

    :raises Unauthorized: unknown, expired, revoked or already used refresh token, or the
        proof of another key (or none) for a bound one.
    """
    row = _lookup(session, refresh_token)
    if row is not None and row.kind == REFRESH and row.revoked:
        raise _reused(session, row)
    if row is None or not row.usable or row.kind != REFRESH or row.jkt != jkt:
        raise Unauthorized("invalid or expired token")
    user = session.get(User, row.user_id)
    rotated = affected(
        session.execute(
            update(AuthToken)
            .where(AuthToken.id == row.id, AuthToken.revoked.is_(False))
            .values(revoked=True)
            .execution_options(synchronize_session=False)
        )
    )
    if rotated != 1 or user is None:
        raise _reused(session, row)
    session.execute(
        update(AuthToken)
        .where(AuthToken.parent_id == row.id, AuthToken.kind == ACCESS)
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )
    pair = issue_pair(
        session,
        user,
        policy,
        second_factor=row.second_factor,
        jkt=row.jkt,
        family_id=row.family_id,
        session_expires=row.expires_at,
    )
    pin_marks.move(session, row.id, pair.session_id)
    audit.append(session, actor=f"user:{user.name}", event=audit.Event.REFRESH)
    return pair


def _reused(session: Session, row: _Token) -> ServerError:
    """Revoke the family of a reused refresh token and audit it; the error to raise (it
    commits both)."""
    revoke_family(session, row.family_id)
    audit.append(
        session,
        actor="unknown",
        event=audit.Event.REFRESH_REUSED,
        subject=f"user:{row.user_name}",
        details={"family": row.family_id, "device_bound": row.jkt is not None},
    )
    return Unauthorized("invalid or expired token").recorded()


def revoke_family(session: Session, family_id: int) -> None:
    """Revoke every token of a login: its refresh tokens, access tokens and PIV PIN marks."""
    session.execute(
        update(AuthToken)
        .where(AuthToken.family_id == family_id)
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )


def revoke(session: Session, token: str, *, owner: Principal | None = None) -> None:
    """Revoke an access or refresh token (a refresh token takes its access tokens along).

    Unknown tokens are ignored (RFC 7009 §2.2). With ``owner`` only that user's tokens are
    revoked.
    """
    row = session.scalar(select(AuthToken).where(AuthToken.token_hash == token_digest(token)))
    if row is None or row.kind not in (ACCESS, REFRESH):
        return
    if owner is not None and owner.kind == "user" and row.user_id != owner.user_id:
        return
    if row.kind == REFRESH:
        revoke_family(session, row.family_id or row.id)
    else:
        row.revoked = True
    user = session.get(User, row.user_id) if row.user_id is not None else None
    audit.append(
        session,
        actor=owner.actor if owner else "system",
        event=audit.Event.LOGOUT,
        subject=f"user:{user.name}" if user else "",
        details={"kind": row.kind},
    )


def create_admin_token(session: Session, *, actor: str = "system") -> str:
    """A new admin API token (no expiry); the caller stores it in a 0600 file."""
    token = new_token()
    _store(session, token, ADMIN, user_id=None, expires_at=None)
    audit.append(
        session, actor=actor, event=audit.Event.SERVER_INIT, details={"admin_token": "created"}
    )
    return token
