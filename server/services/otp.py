# SPDX-License-Identifier: Apache-2.0
"""TOTP second factor (RFC 6238 via pyotp) with replay and rate limits (DESIGN.md rule 6).

A user's wrong one-time passwords share one budget: at most ``otp_max_failures`` within
``otp_window``, counted by :func:`count_failure` in one guarded ``UPDATE`` so parallel guesses
cannot exceed it. Each OTP attempt first *reserves* a failure that way and a correct code gives
the reservation back. A time step is accepted once per user: the ``UPDATE`` that records it
requires ``otp_last_step < step``. (Wrong passwords have budgets of their own, per client
address and per name: :mod:`server.services.login_limits`.)

The seed is the one secret the server must read back (RFC 6238 computes codes from it), so it
is stored sealed under a key the HSM derives for it (``ServerKeys.seal``), bound to its user: a
copy of the database, or a seed moved to another user, gives nothing.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol
from urllib.parse import quote

import pyotp
from sqlalchemy import ColumnElement, case, or_, update
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import affected, server_keys
from server.errors import InvalidOtp, RateLimited
from server.hsm.secrets import ServerKeys
from server.models import User, utcnow
from server.services import audit

ISSUER = "cardbridge"
DIGITS = 6
STEP = 30
DRIFT_STEPS = 1
"""Codes of the previous and next time step are accepted too (clock drift)."""
RATE_LIMITED = "too many failed authentications; try again later"


class OtpHolder(Protocol):
    """Whose one-time password is checked: a ``User``, or an :class:`Owner` read with a key."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def otp_seed(self) -> bytes | None: ...


class Owner(NamedTuple):
    """The OTP state of a user, as read with a credential."""

    id: int
    name: str
    otp_seed: bytes | None
    """The sealed seed."""


def _aad(user_id: int) -> bytes:
    return f"cardbridge totp seed of user {user_id}".encode()


def seal_seed(keys: ServerKeys, user_id: int, secret: str) -> bytes:
    """The stored form of user ``user_id``'s base32 TOTP seed (sealed in the HSM)."""
    return keys.seal(secret.encode("ascii"), _aad(user_id))


def open_seed(keys: ServerKeys, user_id: int, sealed: bytes) -> str:
    """The base32 TOTP seed :func:`seal_seed` sealed for user ``user_id``.

    :raises HsmError: tampered with, or another user's.
    """
    return keys.unseal(sealed, _aad(user_id)).decode("ascii")


def new_secret(session: Session, user: User) -> str:
    """Give ``user`` a fresh TOTP seed and forget the used steps (caller commits); returns the
    seed (base32), which is stored only sealed."""
    secret = pyotp.random_base32()
    user.otp_seed = seal_seed(server_keys(session), user.id, secret)
    user.otp_last_step = None
    user.otp_failures = 0
    user.otp_window_start = None
    return secret


def otpauth_uri(user: User, secret: str, issuer: str = ISSUER) -> str:
    """The ``otpauth://totp/...`` URI that authenticator apps scan."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(
        name=quote(user.name, safe="@."), issuer_name=issuer
    )


def _matching_step(secret: str, code: str, now: datetime) -> int | None:
    if not (len(code) == DIGITS and code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    current = totp.timecode(now)
    match = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            match = step
    return match


def _new_window(policy: Policy, now: datetime) -> ColumnElement[bool]:
    cutoff = now - timedelta(seconds=policy.otp_window)
    return or_(User.otp_window_start.is_(None), User.otp_window_start < cutoff)


def _has_room(policy: Policy, now: datetime) -> ColumnElement[bool]:
    return or_(_new_window(policy, now), User.otp_failures < policy.otp_max_failures)


def count_failure(
    session: Session, user_id: int, policy: Policy, *, now: datetime | None = None
) -> bool:
    """Count one wrong one-time password of the user in one guarded ``UPDATE`` (caller
    commits).

    False, with nothing counted, when the budget is exhausted: the caller raises RateLimited.
    """
    now = now or utcnow()
    new_window = _new_window(policy, now)
    counted = session.execute(
        update(User)
        .where(User.id == user_id, _has_room(policy, now))
        .values(
            otp_failures=case((new_window, 1), else_=User.otp_failures + 1),
            otp_window_start=case((new_window, now), else_=User.otp_window_start),
        )
        .execution_options(synchronize_session=False)
    )
    return affected(counted) == 1


def verify(
    session: Session,
    user: OtpHolder,
    code: str,
    policy: Policy,
    *,
    actor: str | None = None,
    now: datetime | None = None,
) -> None:
    """Accept ``code`` for ``user`` once, or raise (the error records the attempt).

    :raises RateLimited: too many failures in the window (nothing is checked).
    :raises InvalidOtp: wrong code, a step already used, or no TOTP secret.
    """
    now = now or utcnow()
    if not count_failure(session, user.id, policy, now=now):
        raise RateLimited(RATE_LIMITED)
    step = None
    if user.otp_seed is not None:
        secret = open_seed(server_keys(session), user.id, user.otp_seed)
        step = _matching_step(secret, code, now)
    if step is not None:
        accepted = affected(
            session.execute(
                update(User)
                .where(User.id == user.id)
                .where(or_(User.otp_last_step.is_(None), User.otp_last_step < step))
                .values(otp_last_step=step, otp_failures=User.otp_failures - 1)
                .execution_options(synchronize_session=False)
            )
        )
        if accepted == 1:
            return
    audit.append(
        session,
        actor=actor or f"user:{user.name}",
        event=audit.Event.OTP_FAILED,
        subject=f"user:{user.name}",
        details={"reason": "reused" if step is not None else "wrong"},
    )
    raise InvalidOtp("invalid or already used one-time password")
