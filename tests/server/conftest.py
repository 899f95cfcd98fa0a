# SPDX-License-Identifier: Apache-2.0
"""Shared server fixtures: migrated databases on SQLite and on a private PostgreSQL cluster,
sessions over them, the shared SoftHSM2 token, and small factories for users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyotp
import pytest
from argon2 import PasswordHasher
from hsm_fixtures import hsm, hsm_token  # noqa: F401 -- re-exported fixtures
from pgcluster import PgCluster
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.config import Policy
from server.db import make_engine, migrate, session_factory
from server.hsm import Hsm
from server.hsm.secrets import ServerKeys
from server.models import User, utcnow
from server.services import hashing, otp, pins, users

BACKENDS = ("sqlite", "postgresql")
PASSWORD = "correct horse battery"
PIN, PUK = "123456", "12345678"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id with test-sized cost, so hundreds of PIN checks stay fast (the production
    parameters are asserted in test_services_pins.py)."""
    monkeypatch.setattr(
        hashing, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL 15 cluster for the whole run (fails loudly if PostgreSQL is missing)."""
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database in a fresh directory."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'cardbridge.db'}"
    migrate(url)
    return url


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A migrated, fresh PostgreSQL database."""
    url = pg_cluster.create_database()
    migrate(url)
    return url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated database, once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def server_keys(hsm: Hsm) -> ServerKeys:  # noqa: F811 -- the fixture
    """The server's keys (audit MAC, seal, implicit rejection) in the shared test token."""
    return ServerKeys.ensure(hsm)


@pytest.fixture
def sessions(engine: Engine, server_keys: ServerKeys) -> sessionmaker[Session]:
    return session_factory(engine, server_keys)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as s:
        yield s


@pytest.fixture
def policy() -> Policy:
    return Policy()


MakeUser = Callable[..., User]
_SEEDS: dict[int, str] = {}
"""The TOTP seed of each user make_user created (the database holds it only sealed)."""


@pytest.fixture
def make_user(session: Session, policy: Policy) -> MakeUser:
    """Create a user with password, PIN/PUK and a TOTP secret (no keys)."""

    def make(name: str = "alice", *, pin: str = PIN, puk: str = PUK) -> User:
        user = users.add_user(session, name, password=PASSWORD, email=f"{name}@example.org")
        pins.set_initial(user, pin, puk, policy)
        _SEEDS[user.id] = otp.new_secret(session, user)
        session.commit()
        return user

    return make


def totp_of(user: User) -> pyotp.TOTP:
    """The user's authenticator (as enrollment showed it)."""
    return pyotp.TOTP(_SEEDS[user.id])


def totp_now(user: User, offset_steps: int = 0) -> str:
    """The user's current TOTP code (or that of a neighbouring step)."""
    totp = totp_of(user)
    return totp.generate_otp(totp.timecode(utcnow()) + offset_steps)
