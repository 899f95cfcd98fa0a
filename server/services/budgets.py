# SPDX-License-Identifier: Apache-2.0
"""Budgets of events per time window, counted in the database so that every node spends the
same one: failed logins per address and per name (:mod:`server.services.login_limits`), RSA
decryptions per key and login (:mod:`server.services.keyuse`), ``/tsa`` requests per address
(:mod:`server.services.tsa`).

One guarded upsert counts an event: a new window starts at 1, else the count goes up while it
is below the budget; no row comes back when the budget is spent, so parallel requests (on any
node) cannot exceed it. Now and then the expired windows are forgotten.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.db import runner
from server.models import utcnow


class WindowedBudget:
    """The counters of one table: its key columns, a ``window_start`` column and the count.

    Instances are module constants (:func:`server.db.runner` caches their statements).

    :param model: the mapped class of the table.
    :param keys: the columns that name a counter (its primary key).
    :param count: the column that counts the events of the window.
    """

    def __init__(self, model: type[Any], keys: tuple[str, ...], count: str) -> None:
        table = cast(Table, model.__table__)
        new_window = table.c.window_start < bindparam("cutoff")
        counted = table.c[count]
        self._spend = {
            name: dialect.insert(table)
            .values({**{k: bindparam(k) for k in keys}, "window_start": bindparam("now"),
                      count: 1})  # fmt: skip
            .on_conflict_do_update(
                index_elements=[table.c[k] for k in keys],
                set_={
                    count: case((new_window, 1), else_=counted + 1),
                    "window_start": case((new_window, bindparam("now")),
                                         else_=table.c.window_start),  # fmt: skip
                },
                where=or_(new_window, counted < bindparam("budget")),
            )
            .returning(counted)
            for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
        }
        self._forget = delete(table).where(table.c.window_start < bindparam("cutoff"))

    def spend(
        self, session: Session, key: Mapping[str, object], budget: int, window: timedelta
    ) -> bool:
        """Count one event of the counter ``key`` (a value per key column) in the caller's
        transaction; False, with nothing counted, when ``budget`` events of the ``window``
        are spent already."""
        run = runner(session)
        now = utcnow()
        cutoff = now - window
        statement = self._spend[session.get_bind().dialect.name]
        counted = bool(run(statement, {**key, "now": now, "cutoff": cutoff, "budget": budget}))
        if random.random() < 1 / 256:  # noqa: S311 -- housekeeping, not security
            run(self._forget, {"cutoff": cutoff})
        return counted
