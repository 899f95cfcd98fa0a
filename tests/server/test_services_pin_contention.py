# SPDX-License-Identifier: Apache-2.0
"""PIN and PUK checks under load: argon2id runs with no lock held, and sixteen threads checking
PINs at once get only domain errors and exact counters (the benchmark's HTTP 500 was a SQLite
lock timeout behind PIN checks that hashed while holding the write lock)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from conftest import PIN, PUK, MakeUser
from sqlalchemy import Engine, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from test_services_concurrency import run_together

from server.config import Policy
from server.db import make_engine, unit_of_work
from server.errors import PinBlocked, PinIncorrect, PukIncorrect
from server.models import AuditRecord, User
from server.services import audit, hashing, pins, users

THREADS = 16
ROUNDS = 3


def _row_is_free(probe: Engine, user_id: int) -> bool:
    """Whether another connection can write the user's row at once, without waiting."""
    with probe.connect() as c:
        if c.dialect.name == "sqlite":
            c.exec_driver_sql("PRAGMA busy_timeout = 0")
        else:
            c.execute(text("SET LOCAL lock_timeout = '1ms'"))
        try:
            c.execute(update(User).where(User.id == user_id).values(pin_retries=User.pin_retries))
        except OperationalError:
            return False
        finally:
            c.rollback()
    return True


@pytest.mark.parametrize("case", ["right pin", "wrong pin", "right puk", "wrong puk"])
def test_argon2_runs_with_no_lock_held(
    db_url: str,
    session: Session,
    make_user: MakeUser,
    policy: Policy,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    user = make_user()
    probe = make_engine(db_url)
    free: list[bool] = []
    real_verify = pins.verify_secret

    def verify_while_probing(stored: str | None, value: str) -> bool:
        free.append(_row_is_free(probe, user.id))
        return real_verify(stored, value)

    monkeypatch.setattr(pins, "verify_secret", verify_while_probing)
    try:
        if case == "right pin":
            pins.verify(session, user, PIN, policy)
        elif case == "right puk":
            pins.unblock(session, user, PUK, "654321", policy)
        elif case == "wrong pin":
            with pytest.raises(PinIncorrect):
                pins.verify(session, user, "000000", policy)
        else:
            with pytest.raises(PukIncorrect):
                pins.unblock(session, user, "00000000", "654321", policy)
    finally:
        probe.dispose()
    assert free == [True]


def test_sixteen_threads_checking_pins_get_domain_errors_and_exact_counters(
    sessions: sessionmaker[Session],
    session: Session,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A costlier argon2id than the suite's, so checks overlap as they do in production.
    monkeypatch.setattr(
        hashing, "_hasher", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )
    strict, wide = Policy(), Policy(pin_tries=15)
    owner = make_user("owner")  # 3 tries, checked with the right PIN by every thread at once
    target = make_user("target")  # 15 tries, guessed wrong by every thread at once
    session.execute(update(User).where(User.id == target.id).values(pin_retries=15))
    session.commit()

    def work(_: int) -> list[int | str]:
        seen: list[int | str] = []
        for _ in range(ROUNDS):
            with unit_of_work(sessions()) as s:  # never refused while others are in flight
                pins.verify(s, users.get_by_id(s, owner.id), PIN, strict)
            seen.append("ok")
            try:
                with unit_of_work(sessions()) as s:
                    pins.verify(s, users.get_by_id(s, target.id), "000000", wide)
            except PinIncorrect as e:
                seen.append(e.retries)
            except PinBlocked:
                seen.append("blocked")
        return seen

    results = run_together(work, THREADS)
    assert [r for r in results if isinstance(r, BaseException)] == []
    outcomes = [o for r in results for o in r]  # type: ignore[union-attr]
    attempts = THREADS * ROUNDS
    assert outcomes.count("ok") == attempts
    assert sorted(o for o in outcomes if isinstance(o, int)) == list(range(15))  # each try once
    assert outcomes.count("blocked") == attempts - 15
    with sessions() as s:
        assert pins.status(s, owner, strict).pin_retries == 3
        assert pins.status(s, target, wide).pin_retries == 0
        events = list(s.scalars(select(AuditRecord.event)))
        assert events.count(audit.Event.PIN_OK) == attempts
        assert events.count(audit.Event.PIN_FAILED) == attempts
        assert audit.verify(s) is None
