"""``server.db.Direct``: Core statements on a raw DBAPI connection must mean what they mean
through SQLAlchemy (types, literals, RETURNING, transactions), on SQLite and on PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
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

from server.db import Direct, make_engine, runner
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
def direct(engine: Engine) -> Iterator[Direct]:
    _META.create_all(engine)
    d = Direct(engine)
    yield d
    d.close()


def row(i: int, **kw: object) -> dict[str, object]:
    return {"id": i, "name": f"thing-{i}", "at": utcnow(), "data": ["a", {"b": 1}],
            "flag": True, "n": 0, **kw}


def test_types_round_trip_as_through_the_orm(direct: Direct, engine: Engine) -> None:
    when = utcnow() - timedelta(days=3)
    assert direct(INSERT, row(1, at=when)) == []
    direct.commit()
    assert direct(READ, {"id": 1}) == [("thing-1", when, ["a", {"b": 1}], True, 0)]
    with engine.connect() as conn:  # what SQLAlchemy itself reads back
        assert tuple(conn.execute(READ, {"id": 1}).one()) == direct(READ, {"id": 1})[0]


def test_literals_returning_and_guards(direct: Direct) -> None:
    direct(INSERT, row(2))
    direct.commit()
    assert direct(BUMP, {"id": 2, "seen": 0}) == [(1,)]  # the statement's own "+ 1"
    assert direct(BUMP, {"id": 2, "seen": 0}) == []  # the guard lost: no row
    direct.commit()
    assert direct(READ, {"id": 2})[0][-1] == 1


def test_rollback_undoes_and_commit_is_seen_by_other_connections(
    direct: Direct, engine: Engine
) -> None:
    direct(INSERT, row(3))
    direct.rollback()
    assert direct(READ, {"id": 3}) == []
    direct(INSERT, row(3))
    direct.commit()
    with Session(engine) as s:  # the ORM's runner sees the same row
        assert runner(s)(READ, {"id": 3})[0][0] == "thing-3"


def test_an_error_leaves_it_usable(direct: Direct, engine: Engine) -> None:
    direct(INSERT, row(4))
    direct.commit()
    with pytest.raises(engine.dialect.loaded_dbapi.IntegrityError):
        direct(INSERT, row(5, name="thing-4"))  # the name is unique
    direct.rollback()
    direct(INSERT, row(5))
    direct.commit()
    assert direct(READ, {"id": 5})[0][0] == "thing-5"


def test_reconnects_after_the_server_drops_the_connection(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        _META.create_all(engine)
        direct = Direct(engine)
        direct(INSERT, row(6))
        direct.commit()
        (pid,) = direct(select(text("pg_backend_pid()")))[0]
        with engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(engine.dialect.loaded_dbapi.OperationalError):
            direct(READ, {"id": 6})
        direct.rollback()
        assert direct(READ, {"id": 6})[0][0] == "thing-6"  # a new connection
        direct.close()
    finally:
        engine.dispose()


def test_sqlite_writers_queue_on_a_file_lock_held_for_the_unit_of_work(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        _META.create_all(engine)
        direct = Direct(engine)
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

        direct(READ, {"id": 7})
        assert free(), "reads take no lock"
        direct(INSERT, row(7))
        assert not free(), "held from the first write..."
        direct(BUMP, {"id": 7, "seen": 0})
        direct.commit()
        assert free(), "...until the commit"
        direct(BUMP, {"id": 7, "seen": 1})
        direct.rollback()
        assert free() and direct(READ, {"id": 7})[0][-1] == 1
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
        direct.close()
    finally:
        engine.dispose()


def test_expanding_in_parameters_are_refused_not_misrun(direct: Direct) -> None:
    with pytest.raises(ValueError, match="expanding"):
        direct(select(THINGS.c.id).where(THINGS.c.id.in_(bindparam("ids", expanding=True))),
               {"ids": [1, 2]})
