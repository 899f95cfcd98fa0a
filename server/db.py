# SPDX-License-Identifier: Apache-2.0
"""Database engine, sessions and migrations (SQLAlchemy 2 + Alembic).

SQLite (the data directory's default) and PostgreSQL (several server nodes) are both supported;
``postgresql://`` URLs are routed to the psycopg 3 driver.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import CursorResult, Dialect, Engine, Executable, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, ReturnsRows

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for a bare ``postgresql://`` URL."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a 30 s busy timeout.

    Only PostgreSQL connections are pinged when taken from the pool (a server restart drops
    them); a SQLite file connection cannot go stale, so it skips the extra statement.
    """
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (services commit themselves)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic config that runs the packaged migrations against ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = normalize_url(url)
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(url), revision)


def affected(result: Result[Any]) -> int:
    """Rows matched by an ``UPDATE``/``DELETE`` (the guard of every atomic counter)."""
    return cast(CursorResult[Any], result).rowcount


# --- Core statements on a raw DBAPI connection (the signing path) ----------------------------


class Runner(Protocol):
    """Runs one Core statement and returns its rows as tuples (none for DML without
    RETURNING). Guarded updates use ``RETURNING`` so that the rows say whether they won."""

    def __call__(
        self, stmt: Executable, params: Mapping[str, Any] | None = None, /
    ) -> list[tuple[Any, ...]]: ...


def runner(db: Session | Runner) -> Runner:
    """``db`` as a :class:`Runner`: a session runs statements in its own transaction."""
    if not isinstance(db, Session):
        return db
    session = db

    def run(stmt: Executable, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        result = cast(CursorResult[Any], session.execute(stmt, params))
        return [tuple(r) for r in result] if result.returns_rows else []

    return run


@dataclass(frozen=True)
class _Compiled:
    sql: str
    order: tuple[str, ...] | None
    """Bind names in placeholder order for a positional paramstyle; None for named."""
    literals: dict[str, Any]
    """Values the statement carries itself (e.g. the 1 of ``seq + 1``)."""
    binds: dict[str, Callable[[Any], Any]]
    results: tuple[Callable[[Any], Any] | None, ...] | None
    """Per column of the rows; None when no column needs processing."""
    writes: bool


def _compile(stmt: Executable, dialect: Dialect) -> _Compiled:
    compiled = cast(SQLCompiler, cast(ClauseElement, stmt).compile(dialect=dialect))
    binds: dict[str, Callable[[Any], Any]] = {}
    for name, bind in compiled.binds.items():
        if bind.expanding:
            raise ValueError(f"Direct cannot run an expanding IN parameter ({name})")
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            binds[name] = process
    columns = stmt.exported_columns if isinstance(stmt, ReturnsRows) else ()
    results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
    return _Compiled(
        sql=compiled.string,
        order=tuple(compiled.positiontup or ()) if compiled.positional else None,
        literals={n: b.effective_value for n, b in compiled.binds.items() if not b.required},
        binds=binds,
        results=results if any(results) else None,
        writes=bool(compiled.isinsert or compiled.isupdate or compiled.isdelete),
    )


class Direct:
    """One DBAPI connection of ``engine`` with Core statements compiled once per process.

    SQLAlchemy's ``execute`` spent about 60 µs per statement in this Python (cache lookup,
    execution context, result objects) while SQLite itself needed about 10, measured in a loop
    while building this; ``signHash`` runs
    seven statements per request, so it runs them here: the same statements, compiled by
    SQLAlchemy for the engine's dialect, with their types' bind and result processors, on the
    raw connection. Not thread-safe: its owner (one event loop) runs one unit of work at a time
    and must end each with :meth:`commit` or :meth:`rollback`. Transactions begin as the DBAPI
    begins them (pysqlite: at the first write; psycopg: at the first statement).

    On a SQLite file, the first write of a unit of work also takes an exclusive ``flock`` on
    ``<database>-writer.lock`` until the unit ends. Server workers then queue for the write
    lock in the kernel and wake the moment it is free; otherwise SQLite's busy handler makes a
    loser nap for 1 ms, then 2, 5, 10 ms..., which py-spy showed as about 3 % of a worker's
    time under signHash load.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: PoolProxiedConnection | None = None
        self._compiled: dict[int, tuple[Executable, _Compiled]] = {}
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self._lock_path = (
            f"{database}-writer.lock" if database and database != ":memory:" else None
        )
        self._lock_fd: int | None = None
        self._locked = False

    def __call__(
        self, stmt: Executable, params: Mapping[str, Any] | None = None, /
    ) -> list[tuple[Any, ...]]:
        entry = self._compiled.get(id(stmt))
        if entry is None or entry[0] is not stmt:
            entry = (stmt, _compile(stmt, self._engine.dialect))
            self._compiled[id(stmt)] = entry
        c = entry[1]
        values = {**c.literals, **(params or {})}
        for name, process in c.binds.items():
            values[name] = process(values[name])
        args: Sequence[Any] | Mapping[str, Any] = (
            [values[n] for n in c.order] if c.order is not None else values
        )
        if c.writes and not self._locked:
            self._lock_writers()
        cursor = self._connection().cursor()
        try:
            cursor.execute(c.sql, args)
            if cursor.description is None:
                return []
            if c.results is None:
                return [tuple(row) for row in cursor.fetchall()]
            return [
                tuple(v if p is None else p(v) for v, p in zip(row, c.results, strict=True))
                for row in cursor.fetchall()
            ]
        except self._engine.dialect.loaded_dbapi.Error as e:
            if self._engine.dialect.is_disconnect(e, self._conn, cursor):
                self._drop()
            raise
        finally:
            cursor.close()

    def _connection(self) -> PoolProxiedConnection:
        if self._conn is None:
            self._conn = self._engine.raw_connection()
        return self._conn

    def _lock_writers(self) -> None:
        if self._lock_path is None:
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._locked = True

    def _unlock_writers(self) -> None:
        if self._locked and self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._locked = False

    def commit(self) -> None:
        """Commit the unit of work."""
        try:
            if self._conn is not None:
                self._conn.commit()
        finally:
            self._unlock_writers()

    def rollback(self) -> None:
        """Undo the unit of work (after an error, or a refused request)."""
        try:
            if self._conn is not None:
                self._conn.rollback()
        except self._engine.dialect.loaded_dbapi.Error:
            self._drop()
        finally:
            self._unlock_writers()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.invalidate()
            self._conn = None

    def close(self) -> None:
        """Return the connection to the engine's pool (ending any unit of work)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._unlock_writers()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
