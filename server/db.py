# SPDX-License-Identifier: Apache-2.0
"""Database engine, sessions and migrations (SQLAlchemy 2 + Alembic).

SQLite (the data directory's default) and PostgreSQL (several server nodes) are both supported;
``postgresql://`` URLs are routed to the psycopg 3 driver.
"""

from __future__ import annotations

import fcntl
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    CursorResult,
    Dialect,
    Engine,
    Executable,
    Result,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, ReturnsRows

from server.errors import ServerError

if TYPE_CHECKING:
    from server.hsm.secrets import ServerKeys

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT = 5
"""Seconds a new PostgreSQL connection may take (libpq ``connect_timeout``) unless the URL sets
its own: a request fails as unavailable instead of hanging on an unreachable server."""


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


SQLITE_MODE: Final = 0o600


def private_sqlite_file(url: str) -> None:
    """Make a SQLite database file owner-only (mode 0600) before SQLite opens it.

    SQLite creates a database with mode 0644 (less the umask) and gives its ``-wal`` and
    ``-shm`` files the database file's mode, so the file is created 0600 here first; an
    existing one (and its ``-wal``/``-shm``) is narrowed to 0600. Nothing for other databases.
    """
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return
    fd = os.open(u.database, os.O_RDWR | os.O_CREAT, SQLITE_MODE)
    os.close(fd)
    for path in (u.database, f"{u.database}-wal", f"{u.database}-shm"):
        try:
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, SQLITE_MODE)
        except FileNotFoundError:
            pass


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys, a 30 s busy timeout, the writer
    queue of :class:`WriterLock` and owner-only files (:func:`private_sqlite_file`).

    Only PostgreSQL connections are pinged when taken from the pool (a server restart drops
    them, and the ping replaces them, so the first request after a restart succeeds); a SQLite
    file connection cannot go stale, so it skips the extra statement.
    """
    url = normalize_url(url)
    private_sqlite_file(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        database = engine.url.database
        if database and database != ":memory:":
            WriterLock(f"{database}-writer.lock").install(engine)
        return engine
    given = "connect_timeout" in make_url(url).query
    connect_args = {} if given else {"connect_timeout": CONNECT_TIMEOUT}
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args
    )


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says that the database cannot be reached now: down, restarting, a
    dropped connection, no free pooled connection. The same request may succeed later.

    ``exc`` is SQLAlchemy's (sessions, the pool) or psycopg's own (:func:`runner` raises the
    driver's errors).
    """
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or (exc.orig is not None and unavailable(exc.orig))
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


KEYS: Final = "server_keys"
"""Where a session carries the server's HSM keys (``Session.info``)."""


def session_factory(engine: Engine, keys: ServerKeys | None = None) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (the request, or the CLI command,
    that owns the session commits once), carrying the server's HSM keys for the services that
    need them (:func:`server_keys`)."""
    return sessionmaker(engine, expire_on_commit=False, info={KEYS: keys})


def bind_keys(sessions: sessionmaker[Session], keys: ServerKeys) -> None:
    """Give the sessions ``sessions`` makes from now on the server's HSM keys."""
    sessions.configure(info={KEYS: keys})


def server_keys(session: Session) -> ServerKeys:
    """The server's HSM keys: the audit MAC, the seal of TOTP seeds, RSA implicit rejection
    (:mod:`server.hsm.secrets`), which a unit of work needs as it needs its connection.

    :raises RuntimeError: the session was made without them (a programming error).
    """
    keys: ServerKeys | None = session.info.get(KEYS)
    if keys is None:
        raise RuntimeError("this session has no server keys (session_factory(engine, keys))")
    return keys


_WRITER_LOCKS: weakref.WeakKeyDictionary[Engine, WriterLock] = weakref.WeakKeyDictionary()


class WriterLock:
    """Queues a SQLite file's writers on an exclusive ``flock`` of ``path``.

    SQLite lets one transaction write at a time; a loser's busy handler naps 1 ms, then 2, 5,
    10 ms..., which py-spy showed as about 3 % of a server worker's time under signing load.
    With this lock the first write of a transaction waits in the kernel instead and wakes the
    moment the previous writer commits or rolls back. Each pooled connection has its own open
    file (``flock`` belongs to the open file, so two connections of one process exclude each
    other like two processes do).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def install(self, engine: Engine) -> None:
        """Take the lock before each transaction's first write and free it when it ends."""
        _WRITER_LOCKS[engine] = self
        event.listen(engine, "before_cursor_execute", self._before_execute)
        for name in ("commit", "rollback"):
            event.listen(engine, name, self._release)
        # A connection returned to the pool (or invalidated) mid-transaction ends it too.
        event.listen(engine, "reset", self._on_reset)
        event.listen(engine, "invalidate", self._on_invalidate)

    def _before_execute(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip()[:6].upper().startswith(("SELECT", "PRAGMA")):
            self.acquire(conn.info)

    def _release(self, conn: Any) -> None:
        self.release(conn.info)

    def _on_reset(self, dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        self.release(connection_record.info)

    def _on_invalidate(
        self, dbapi_connection: Any, connection_record: Any, exception: Any
    ) -> None:
        self.release(connection_record.info)

    def acquire(self, info: dict[Any, Any]) -> None:
        """Take the lock for the connection whose ``info`` this is (no-op if it holds it)."""
        if info.get(self) is True:
            return
        fd = info.get((self, "fd"))
        if fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            info[(self, "fd")] = fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        info[self] = True

    def release(self, info: dict[Any, Any]) -> None:
        """Free the lock of the connection whose ``info`` this is, if it holds it."""
        if info.pop(self, False):
            fcntl.flock(info[(self, "fd")], fcntl.LOCK_UN)


@contextmanager
def unit_of_work(session: Session) -> Iterator[Session]:
    """End ``session``'s transaction once, when the block ends: commit when it returns, roll back
    when it raises, except for a :class:`~server.errors.ServerError` that records an attempt
    (``commit``: a try spent, a refusal audited), whose writes are committed before it goes on.
    The session is closed either way. The one rule of every request and CLI command."""
    try:
        yield session
    except ServerError as e:
        _end(session, commit=e.commit)
        raise
    except BaseException:
        _end(session, commit=False)
        raise
    _end(session, commit=True)


def _end(session: Session, *, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


def alembic_config(url: str, keys: ServerKeys | None = None) -> Config:
    """An Alembic config that runs the packaged migrations against ``url``; ``keys`` are the
    HSM keys that migrations of existing secrets need (:func:`migration_keys`)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = normalize_url(url)
    cfg.attributes[KEYS] = keys
    return cfg


def migrate(url: str, revision: str = "head", *, keys: ServerKeys | None = None) -> None:
    """Upgrade the database at ``url`` to ``revision`` (idempotent)."""
    private_sqlite_file(url)
    command.upgrade(alembic_config(url, keys), revision)


def migration_keys() -> ServerKeys:
    """In a migration: the server keys ``server init`` passed, for rows whose secrets a
    migration seals or MACs.

    :raises RuntimeError: none were passed (``migrate`` outside ``server init``).
    """
    from alembic import context

    keys: ServerKeys | None = context.config.attributes.get(KEYS)
    if keys is None:
        raise RuntimeError(
            "this upgrade needs the HSM: run `cardbridge server init --data DIR` to upgrade"
        )
    return keys


def affected(result: Result[Any]) -> int:
    """Rows matched by an ``UPDATE``/``DELETE`` (the guard of every atomic counter)."""
    return cast(CursorResult[Any], result).rowcount


# --- Core statements on the session's DBAPI connection (the per-request hot path) -------------


class Runner(Protocol):
    """Runs one Core statement in a session's transaction and returns its rows as tuples (none
    for DML without RETURNING). Guarded updates use ``RETURNING`` so that the rows say whether
    they won."""

    def __call__(
        self, stmt: Executable, params: Mapping[str, Any] | None = None, /
    ) -> list[tuple[Any, ...]]: ...


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
            raise ValueError(f"a Runner cannot run an expanding IN parameter ({name})")
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


_COMPILED: dict[tuple[int, str], tuple[Executable, _Compiled]] = {}
"""Statements compiled per (statement, dialect); the statements are module constants."""


def runner(session: Session) -> Runner:
    """Run prebuilt Core statements in ``session``'s transaction, on its DBAPI connection.

    ``Session.execute`` spent about 60 µs per statement in this Python (cache lookup, execution
    context, result objects) while SQLite itself needed about 10, measured in a loop when the
    signing path was first tuned; the statements every request runs (token, credential, PIN
    mark, audit append) therefore run here: the same statements, compiled once per dialect by
    SQLAlchemy, with their types' bind and result processors, on the connection the session
    holds for its current transaction (begun if none is). Statements must be module-level
    constants (they are cached by identity). The session still owns the transaction: it commits
    or rolls back.
    """
    dialect = session.get_bind().dialect
    writer_lock = _writer_lock(session.get_bind())

    def run(stmt: Executable, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        key = (id(stmt), dialect.name)
        entry = _COMPILED.get(key)
        if entry is None or entry[0] is not stmt:
            entry = (stmt, _compile(stmt, dialect))
            _COMPILED[key] = entry
        c = entry[1]
        values = {**c.literals, **(params or {})}
        for name, process in c.binds.items():
            values[name] = process(values[name])
        args: Sequence[Any] | Mapping[str, Any] = (
            [values[n] for n in c.order] if c.order is not None else values
        )
        conn = session.connection()
        dbapi = conn.connection.dbapi_connection
        if dbapi is None:
            raise RuntimeError("the session's connection is closed")
        if c.writes and writer_lock is not None:
            writer_lock.acquire(conn.info)
        cursor = dbapi.cursor()
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
        except dialect.loaded_dbapi.Error as e:
            if dialect.is_disconnect(e, dbapi, cursor):
                conn.invalidate(e)
            raise
        finally:
            cursor.close()

    return run


def _writer_lock(bind: Engine | Connection) -> WriterLock | None:
    return _WRITER_LOCKS.get(bind.engine)
