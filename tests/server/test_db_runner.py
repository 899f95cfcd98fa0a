"""``server.db.runner``: Core statements run on a session's DBAPI connection must mean what they
mean through SQLAlchemy (types, literals, RETURNING, transactions), on SQLite and on PostgreSQL,
and share the session's transaction; ``unit_of_work`` ends it once; SQLite writers queue on a
file lock held for the transaction."""

from __future__ import annotations

import fcntl
import os
import stat
from datetime import timedelta

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from server.db import make_engine, runner, session_factory, unit_of_work
from server.errors import InvalidRequest, PinIncorrect
from server.models import UtcDateTime, utcnow

_META = MetaData()
THINGS = Table(
    "direct_things",
    _META,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(32), unique=True),
    Column("at", UtcDateTime),
    Column("data", JSON),
    Column("flag", Boolean),
    Column("n", Integer),
)
INSERT = insert(THINGS).values(
    id=bindparam("id"), name=bindparam("name"), at=bindparam("at"), data=bindparam("data"),
    flag=bindparam("flag"), n=bindparam("n"),
)
READ = select(THINGS.c.name, THINGS.c.at, THINGS.c.data, THINGS.c.flag, THINGS.c.n).where(
    THINGS.c.id == bindparam("id")
)
BUMP = (
    update(THINGS)
    .where(THINGS.c.id == bindparam("id"), THINGS.c.n == bindparam("seen"))
    .values(n=THINGS.c.n + 1)
    .returning(THINGS.c.n)
)


@pytest.fixture
def tables(engine: Engine) -> Engine:
    _META.create_all(engine)
    return engine


def row(i: int, **kw: object) -> dict[str, object]:
    return {"id": i, "name": f"thing-{i}", "at": utcnow(), "data": ["a", {"b": 1}],
            "flag": True, "n": 0, **kw}


def test_types_round_trip_as_through_the_orm(tables: Engine) -> None:
    when = utcnow() - timedelta(days=3)
    with Session(tables) as s:
        run = runner(s)
        assert run(INSERT, row(1, at=when)) == []
        s.commit()
        ours = run(READ, {"id": 1})
        assert ours == [("thing-1", when, ["a", {"b": 1}], True, 0)]
    with tables.connect() as conn:  # what SQLAlchemy itself reads back
        assert tuple(conn.execute(READ, {"id": 1}).one()) == ours[0]


def test_literals_returning_and_guards(tables: Engine) -> None:
    with Session(tables) as s:
        run = runner(s)
        run(INSERT, row(2))
        assert run(BUMP, {"id": 2, "seen": 0}) == [(1,)]  # the statement's own "+ 1"
        assert run(BUMP, {"id": 2, "seen": 0}) == []  # the guard lost: no row
        s.commit()
        assert run(READ, {"id": 2})[0][-1] == 1


def test_runner_and_orm_share_the_sessions_transaction(tables: Engine) -> None:
    with Session(tables) as s:
        runner(s)(INSERT, row(3))
        assert s.execute(READ, {"id": 3}).one()[0] == "thing-3"  # the ORM sees it uncommitted
        s.rollback()
        assert runner(s)(READ, {"id": 3}) == []  # and the rollback undid it
        runner(s)(INSERT, row(3))
        s.commit()
    with Session(tables) as other:
        assert runner(other)(READ, {"id": 3})[0][0] == "thing-3"


def test_unit_of_work_commits_rolls_back_and_keeps_recorded_attempts(tables: Engine) -> None:
    sessions = session_factory(tables)
    with unit_of_work(sessions()) as s:
        runner(s)(INSERT, row(4))
    with pytest.raises(InvalidRequest), unit_of_work(sessions()) as s:
        runner(s)(INSERT, row(5))
        raise InvalidRequest("refused: nothing is kept")
    with pytest.raises(PinIncorrect), unit_of_work(sessions()) as s:
        runner(s)(INSERT, row(6))
        raise PinIncorrect(2)  # records an attempt: its writes are kept
    with pytest.raises(RuntimeError), unit_of_work(sessions()) as s:
        runner(s)(INSERT, row(7))
        raise RuntimeError("a bug: nothing is kept")
    with Session(tables) as s:
        kept = {i for i in range(4, 8) if runner(s)(READ, {"id": i})}
    assert kept == {4, 6}


def test_an_error_leaves_the_session_usable_after_rollback(tables: Engine) -> None:
    with Session(tables) as s:
        runner(s)(INSERT, row(8))
        s.commit()
        with pytest.raises(tables.dialect.loaded_dbapi.IntegrityError):
            runner(s)(INSERT, row(9, name="thing-8"))  # the name is unique
        s.rollback()
        runner(s)(INSERT, row(9))
        s.commit()
        assert runner(s)(READ, {"id": 9})[0][0] == "thing-9"


def test_reconnects_after_the_server_drops_the_connection(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        _META.create_all(engine)
        with Session(engine) as s:
            runner(s)(INSERT, row(10))
            s.commit()
            (pid,) = runner(s)(select(text("pg_backend_pid()")))[0]  # held until the commit
            with engine.connect() as admin:  # the pool's second connection
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(engine.dialect.loaded_dbapi.OperationalError):
                runner(s)(READ, {"id": 10})
            s.rollback()
            assert runner(s)(READ, {"id": 10})[0][0] == "thing-10"  # a new connection
    finally:
        engine.dispose()


def test_sqlite_writers_queue_on_a_file_lock_held_for_the_transaction(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        _META.create_all(engine)
        lock = f"{engine.url.database}-writer.lock"

        def free() -> bool:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: contends
                return True
            except BlockingIOError:
                return False
            finally:
                os.close(fd)

        with Session(engine) as s:
            runner(s)(READ, {"id": 11})
            assert free(), "reads take no lock"
            runner(s)(INSERT, row(11))
            assert not free(), "held from the first write..."
            runner(s)(BUMP, {"id": 11, "seen": 0})
            s.commit()
            assert free(), "...until the commit"
            s.execute(text("UPDATE direct_things SET n = n + 1 WHERE id = 11"))  # SQLAlchemy's
            assert not free(), "ORM and Core writes take it too..."
            s.rollback()
            assert free(), "...until the rollback"
            assert runner(s)(READ, {"id": 11})[0][-1] == 1
            runner(s)(BUMP, {"id": 11, "seen": 1})
        assert free(), "closing a session mid-transaction frees it"
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    finally:
        engine.dispose()


def test_expanding_in_parameters_are_refused_not_misrun(tables: Engine) -> None:
    with Session(tables) as s, pytest.raises(ValueError, match="expanding"):
        runner(s)(select(THINGS.c.id).where(THINGS.c.id.in_(bindparam("ids", expanding=True))),
                  {"ids": [1, 2]})
