# SPDX-License-Identifier: Apache-2.0
"""TOTP second factor (RFC 6238 via pyotp) with replay and rate limits (DESIGN.md rule 6).

Each attempt first *reserves* a failure in one guarded ``UPDATE`` (refused once
``otp_max_failures`` failures fall within ``otp_window``), so parallel guesses cannot exceed the
limit; a correct code gives the reservation back. A time step is accepted once per user: the
``UPDATE`` that records it requires ``otp_last_step < step``.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta
from urllib.parse import quote

import pyotp
from sqlalchemy import case, or_, update
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import affected
from server.errors import InvalidOtp, RateLimited
from server.models import User, utcnow
from server.services import audit

ISSUER = "cardbridge"
DIGITS = 6
STEP = 30
DRIFT_STEPS = 1
"""Codes of the previous and next time step are accepted too (clock drift)."""


def new_secret(user: User) -> str:
    """Give ``user`` a fresh TOTP seed (base32) and forget the used steps (caller commits)."""
    secret = pyotp.random_base32()
    user.otp_secret = secret
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


def verify(
    session: Session,
    user: User,
    code: str,
    policy: Policy,
    *,
    actor: str | None = None,
    now: datetime | None = None,
) -> None:
    """Accept ``code`` for ``user`` once, or raise; commits the counters either way.

    :raises RateLimited: too many failures in the window (nothing is checked).
    :raises InvalidOtp: wrong code, a step already used, or no TOTP secret.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=policy.otp_window)
    new_window = or_(User.otp_window_start.is_(None), User.otp_window_start < cutoff)
    reserved = affected(
        session.execute(
            update(User)
            .where(User.id == user.id)
            .where(or_(new_window, User.otp_failures < policy.otp_max_failures))
            .values(
                otp_failures=case((new_window, 1), else_=User.otp_failures + 1),
                otp_window_start=case((new_window, now), else_=User.otp_window_start),
            )
            .execution_options(synchronize_session=False)
        )
    )
    if reserved != 1:
        session.rollback()
        raise RateLimited("too many failed one-time passwords; try again later")
    step = _matching_step(user.otp_secret, code, now) if user.otp_secret else None
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
            session.commit()
            return
    audit.append(
        session,
        actor=actor or f"user:{user.name}",
        event=audit.Event.OTP_FAILED,
        subject=f"user:{user.name}",
        details={"reason": "reused" if step is not None else "wrong"},
    )
    session.commit()
    raise InvalidOtp("invalid or already used one-time password")
