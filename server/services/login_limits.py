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
import random
from datetime import datetime, timedelta
from typing import Final, cast

from sqlalchemy import Table, and_, bindparam, case, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import runner
from server.models import LoginFailures, utcnow

ADDRESS: Final = "address"
NAME: Final = "name"

_T = cast(Table, LoginFailures.__table__)
_NEW_WINDOW = _T.c.window_start < bindparam("cutoff")
# A guarded upsert per counter: a new window starts at 1, else the count goes up while below
# the budget; no row comes back when the budget is spent (parallel guesses cannot exceed it).
_COUNT = {
    name: dialect.insert(_T)
    .values(scope=bindparam("scope"), key=bindparam("key"), failures=1,
            window_start=bindparam("now"))  # fmt: skip
    .on_conflict_do_update(
        index_elements=[_T.c.scope, _T.c.key],
        set_={
            "failures": case((_NEW_WINDOW, 1), else_=_T.c.failures + 1),
            "window_start": case((_NEW_WINDOW, bindparam("now")), else_=_T.c.window_start),
        },
        where=or_(_NEW_WINDOW, _T.c.failures < bindparam("budget")),
    )
    .returning(_T.c.failures)
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
}
_SPENT = select(_T.c.scope).where(
    or_(
        and_(_T.c.scope == ADDRESS, _T.c.key == bindparam("address"),
             _T.c.failures >= bindparam("address_budget")),
        and_(_T.c.scope == NAME, _T.c.key == bindparam("name"),
             _T.c.failures >= bindparam("name_budget")),
    ),
    _T.c.window_start >= bindparam("cutoff"),
)  # fmt: skip
_FORGET = delete(_T).where(_T.c.window_start < bindparam("cutoff"))


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
    run = runner(session)
    now = utcnow()
    cutoff = _cutoff(policy, now)
    statement = _COUNT[session.get_bind().dialect.name]
    counted = True
    for scope, counter_key, budget in (
        (ADDRESS, address, policy.login_address_failures),
        (NAME, name_digest(key), policy.login_name_failures),
    ):
        params = {"scope": scope, "key": counter_key, "now": now, "cutoff": cutoff,
                  "budget": budget}  # fmt: skip
        counted = bool(run(statement, params)) and counted
    if random.random() < 1 / 256:  # noqa: S311 -- housekeeping, not security
        run(_FORGET, {"cutoff": cutoff})
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
