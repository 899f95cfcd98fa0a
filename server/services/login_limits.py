# SPDX-License-Identifier: Apache-2.0
"""Budgets of failed password logins (DESIGN.md rule 6), per client address and per user name.

A budget per user alone let anyone lock any user out (five wrong passwords, then even the
right one got 429), and told known names from unknown ones (only known names were ever
locked). Here:

- each client address has ``Policy.login_address_failures`` failures per ``login_window``:
  one client's guessing locks out that client, not the owner logging in from elsewhere;
- each user *name*, known or not, has ``login_name_failures`` per window, from all addresses
  together (a slow guess from many addresses); far above the address budget, and an
  administrator sees and lifts it (``cardbridge admin user list``, ``user unlock``).

Names are counted under the SHA-256 of their key (:func:`server.services.users.name_key`),
unknown names exactly like known ones, so neither the answers nor the timing say which names
exist. The address is the TCP peer: ``server run`` trusts no ``X-Forwarded-For``, so behind a
load balancer every client shares the balancer's address and budget unless the balancer keeps
the client address (PROXY protocol, or TLS passthrough).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Final, cast

from sqlalchemy import Table, and_, bindparam, delete, or_, select
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import runner
from server.models import LoginFailures, utcnow
from server.services.budgets import WindowedBudget

ADDRESS: Final = "address"
NAME: Final = "name"

_T = cast(Table, LoginFailures.__table__)
_FAILURES = WindowedBudget(LoginFailures, ("scope", "key"), "failures")
_SPENT = select(_T.c.scope).where(
    or_(
        and_(_T.c.scope == ADDRESS, _T.c.key == bindparam("address"),
             _T.c.failures >= bindparam("address_budget")),
        and_(_T.c.scope == NAME, _T.c.key == bindparam("name"),
             _T.c.failures >= bindparam("name_budget")),
    ),
    _T.c.window_start >= bindparam("cutoff"),
)  # fmt: skip


def name_digest(key: str) -> str:
    """Under what a name key is counted (unknown names are not stored in clear)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _cutoff(policy: Policy, now: datetime) -> datetime:
    return now - timedelta(seconds=policy.login_window)


def spent(session: Session, policy: Policy, address: str, key: str) -> bool:
    """Whether the address's or the name's budget is spent now (a read; nothing counted)."""
    rows = runner(session)(
        _SPENT,
        {
            "address": address,
            "name": name_digest(key),
            "address_budget": policy.login_address_failures,
            "name_budget": policy.login_name_failures,
            "cutoff": _cutoff(policy, utcnow()),
        },
    )
    return bool(rows)


def count_failure(session: Session, policy: Policy, address: str, key: str) -> bool:
    """Count a failed login against the address and the name, in the caller's transaction;
    False when a budget was spent already (the caller answers 429). Now and then the expired
    windows are forgotten."""
    window = timedelta(seconds=policy.login_window)
    counted = True
    for scope, counter_key, budget in (
        (ADDRESS, address, policy.login_address_failures),
        (NAME, name_digest(key), policy.login_name_failures),
    ):
        counted = _FAILURES.spend(session, {"scope": scope, "key": counter_key}, budget,
                                  window) and counted  # fmt: skip
    return counted


def name_failures(session: Session, policy: Policy, key: str) -> int:
    """The name's failed logins in the current window (the administrator's view)."""
    found = session.scalar(
        select(LoginFailures.failures).where(
            LoginFailures.scope == NAME,
            LoginFailures.key == name_digest(key),
            LoginFailures.window_start >= _cutoff(policy, utcnow()),
        )
    )
    return int(found or 0)


def forget_name(session: Session, key: str) -> None:
    """Lift the name's budget (an administrator unlocks the user)."""
    session.execute(
        delete(LoginFailures).where(
            LoginFailures.scope == NAME, LoginFailures.key == name_digest(key)
        )
    )
