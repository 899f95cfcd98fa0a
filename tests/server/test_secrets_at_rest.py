# SPDX-License-Identifier: Apache-2.0
"""Finding 8, as an attacker who copies the data directory: the SQLite files are owner-only
from their creation on, and the TOTP seeds in them are sealed with an HSM key (a copy of the
database gives no second factor), bound to their user (a seed moved to another row does not
open)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from apikit import Api, api_db_url_fixture, api_fixture  # noqa: F401
from sqlalchemy import select, text, update

from server.db import SQLITE_MODE, alembic_config, make_engine, migrate, session_factory
from server.errors import HsmError
from server.hsm.secrets import ServerKeys
from server.models import User
from server.services import otp


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """The umask of a careless service manager: new files 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_sqlite_files_are_owner_only_from_creation(tmp_path: Path, wide_umask: None) -> None:
    db = tmp_path / "cardbridge.db"
    url = f"sqlite:///{db}"
    migrate(url)
    engine = make_engine(url)
    try:
        with engine.connect() as c:  # an open WAL connection that wrote: -wal and -shm exist
            c.execute(text("UPDATE audit_head SET last_seq = last_seq"))
            c.commit()
            files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
            assert all(f.exists() for f in files)
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == SQLITE_MODE, f
    finally:
        engine.dispose()


def test_an_existing_world_readable_database_is_narrowed(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    url = f"sqlite:///{db}"
    migrate(url)
    db.chmod(0o644)
    make_engine(url).dispose()
    assert stat.S_IMODE(db.stat().st_mode) == SQLITE_MODE


def test_a_copy_of_the_database_holds_no_totp_seed(api: Api) -> None:
    user = api.user(prefix="seed")
    seed = user.totp.secret
    db = Path(api.settings.db_url.removeprefix("sqlite:///"))
    with api.sessions() as s:
        s.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        stored = s.scalar(select(User.otp_seed).where(User.name == user.name))
    assert stored is not None and seed.encode() not in stored
    for path in (db, Path(f"{db}-wal")):
        if path.exists():
            assert seed.encode() not in path.read_bytes(), path
    # The server still checks codes with it (the seed is opened in the HSM).
    api.login(user)


def test_a_sealed_seed_moved_to_another_user_does_not_open(api: Api) -> None:
    victim, attacker = api.user(prefix="victim"), api.user(prefix="mover")
    with api.sessions() as s:
        sealed = s.scalar(select(User.otp_seed).where(User.name == attacker.name))
        s.execute(update(User).where(User.name == victim.name).values(otp_seed=sealed))
        s.commit()
        moved = s.scalars(select(User).where(User.name == victim.name)).one()
        keys = ServerKeys(api.client.app.state.hsm)  # type: ignore[attr-defined]
        assert moved.otp_seed is not None
        with pytest.raises(HsmError):
            otp.open_seed(keys, moved.id, moved.otp_seed)


def test_the_upgrade_seals_existing_seeds(
    sqlite_url: str, server_keys: ServerKeys
) -> None:
    """A database of the previous release with a clear seed: migrating without the HSM is
    refused, ``server init``'s migration (with the keys) seals it and drops the clear column."""
    cfg = alembic_config(sqlite_url)
    from alembic import command

    command.downgrade(cfg, "0002")
    seed = pyotp.random_base32()
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO users (id, name, disabled, created_at, pin_retries, "
                           "puk_retries, otp_failures, otp_secret) VALUES (7, 'old', 0, "
                           "'2025-01-01 00:00:00', 0, 0, 0, :seed)"), {"seed": seed})
    finally:
        engine.dispose()
    with pytest.raises(RuntimeError, match="server init"):
        migrate(sqlite_url)
    migrate(sqlite_url, keys=server_keys)
    engine = make_engine(sqlite_url)
    try:
        with session_factory(engine, server_keys)() as s:
            user = s.scalars(select(User).where(User.id == 7)).one()
            assert user.otp_seed is not None and seed.encode() not in user.otp_seed
            assert otp.open_seed(server_keys, 7, user.otp_seed) == seed
            columns = {r[1] for r in s.execute(text("PRAGMA table_info(users)"))}
            assert "otp_secret" not in columns
    finally:
        engine.dispose()
