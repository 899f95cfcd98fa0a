# SPDX-License-Identifier: Apache-2.0
"""PIN and PUK rules (DESIGN.md rules 2, 5): counters, blocking, unblocking, persistence."""

from __future__ import annotations

import pytest
from conftest import PIN, PUK, MakeUser
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import Policy
from server.db import make_engine, session_factory, unit_of_work
from server.errors import InvalidRequest, PinBlocked, PinIncorrect, PukIncorrect
from server.hsm.secrets import ServerKeys
from server.models import AuditRecord, User
from server.services import audit, hashing, pins


def test_production_hashes_are_argon2id(make_user: MakeUser, session: Session) -> None:
    stored = hashing.PRODUCTION_HASHER.hash(PIN)
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert hashing.PRODUCTION_HASHER.verify(stored, PIN)
    user = make_user()
    assert user.pin_hash is not None and user.pin_hash.startswith("$argon2id$")
    assert user.puk_hash is not None and user.password_hash is not None


def test_correct_pin_resets_counter(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    with pytest.raises(PinIncorrect) as e:
        pins.verify(session, user, "000000", policy)
    assert e.value.retries == 2
    pins.verify(session, user, PIN, policy)
    assert pins.status(session, user, policy).pin_retries == 3


def test_three_wrong_pins_block_and_it_survives_reopening(
    db_url: str, session: Session, make_user: MakeUser, policy: Policy, server_keys: ServerKeys
) -> None:
    user = make_user()
    left = []
    for _ in range(3):
        with pytest.raises(PinIncorrect) as e, unit_of_work(session):
            pins.verify(session, user, "999999", policy)
        left.append(e.value.retries)
    assert left == [2, 1, 0]
    with pytest.raises(PinBlocked), unit_of_work(session):
        pins.verify(session, user, PIN, policy)

    engine = make_engine(db_url)  # a new engine: what a restarted server sees
    try:
        with session_factory(engine, server_keys)() as fresh:
            again = fresh.scalars(select(User).where(User.name == "alice")).one()
            assert again.pin_retries == 0
            with pytest.raises(PinBlocked):
                pins.verify(fresh, again, PIN, policy)
            assert pins.status(fresh, again, policy).blocked
    finally:
        engine.dispose()


def test_puk_unblocks_and_wrong_puk_counts(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    for _ in range(3):
        with pytest.raises(PinIncorrect):
            pins.verify(session, user, "999999", policy)
    with pytest.raises(PukIncorrect) as e:
        pins.unblock(session, user, "00000000", "654321", policy)
    assert e.value.retries == 2
    pins.unblock(session, user, PUK, "654321", policy)
    st = pins.status(session, user, policy)
    assert (st.pin_retries, st.puk_retries) == (3, 3)
    with pytest.raises(PinIncorrect):
        pins.verify(session, user, PIN, policy)  # the old PIN is gone
    pins.verify(session, user, "654321", policy)


def test_blocked_puk_needs_the_admin(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    for _ in range(3):
        with pytest.raises(PukIncorrect):
            pins.unblock(session, user, "00000000", "654321", policy)
    with pytest.raises(PinBlocked):
        pins.unblock(session, user, PUK, "654321", policy)
    new_pin = pins.admin_unblock(session, user, policy)
    assert len(new_pin) == 6 and new_pin.isdigit()
    pins.verify(session, user, new_pin, policy)
    pins.unblock(session, user, PUK, "111111", policy)  # PUK counter was reset too


def test_change_pin(session: Session, make_user: MakeUser, policy: Policy) -> None:
    user = make_user()
    with pytest.raises(PinIncorrect):
        pins.change(session, user, "999999", "222222", policy)
    pins.change(session, user, PIN, "222222", policy)
    pins.verify(session, user, "222222", policy)
    with pytest.raises(InvalidRequest):
        pins.change(session, user, "222222", "12", policy)


@pytest.mark.parametrize("bad", ["12345", "123456789", "12345\n", "ÄÄÄÄÄÄ"])
def test_pin_format(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        pins.validate_pin(bad)


def test_pin_events_are_audited_without_the_pin(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    with pytest.raises(PinIncorrect):
        pins.verify(session, user, "987654", policy)
    pins.verify(session, user, PIN, policy)
    events = [r.event for r in session.scalars(select(AuditRecord).order_by(AuditRecord.seq))]
    assert events[-2:] == [audit.Event.PIN_FAILED, audit.Event.PIN_OK]
    dump = str(list(audit.export(session)))
    assert "987654" not in dump and PIN not in dump and PUK not in dump
    assert audit.verify(session) is None


def test_the_user_object_shows_the_counters_without_flushing_them(
    session: Session, make_user: MakeUser, policy: Policy
) -> None:
    user = make_user()
    with pytest.raises(PinIncorrect):
        pins.verify(session, user, "000000", policy)
    assert user.pin_retries == 2 and user not in session.dirty
    for _ in range(2):
        with pytest.raises(PinIncorrect):
            pins.verify(session, user, "000000", policy)
    assert user.pin_retries == 0
    pins.unblock(session, user, PUK, "654321", policy)
    assert (user.pin_retries, user.puk_retries) == (3, 3) and user not in session.dirty
