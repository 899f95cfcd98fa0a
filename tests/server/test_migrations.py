# SPDX-License-Identifier: Apache-2.0
"""Migrations run from package data on SQLite and PostgreSQL, idempotently, and match the
models exactly."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from server.db import alembic_config, make_engine, migrate
from server.models import Base


def test_migrations_match_the_models_and_rerun(db_url: str) -> None:
    migrate(db_url)  # second run: nothing to do
    command.check(alembic_config(db_url))  # raises if models and migrations differ
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {
            "alembic_version"
        }
        with engine.connect() as c:
            assert c.execute(text("SELECT last_seq, last_hash FROM audit_head")).one() == (
                0,
                "0" * 64,
            )
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "base")
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    migrate(db_url)
    command.check(cfg)


def test_the_upgrade_keys_names_case_insensitively_and_disables_lookalikes(db_url: str) -> None:
    """Finding 11's migration: before it, ALICE and alice could both exist. The first keeps the
    name; the later one is disabled, its key suffixed, so the unique key can hold."""
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "0006")
    engine = make_engine(db_url)
    try:
        with engine.begin() as c:
            for user_id, name in ((1, "alice"), (2, "ALICE"), (3, "bob")):
                c.execute(text("INSERT INTO users (id, name, disabled, created_at, pin_retries, "
                               "puk_retries, otp_failures) VALUES (:id, :name, false, "
                               "'2025-01-01 00:00:00', 0, 0, 0)"), {"id": user_id, "name": name})
        migrate(db_url)
        with engine.connect() as c:
            rows = c.execute(text("SELECT id, name_key, disabled FROM users ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, "alice", False), (2, "alice~2", True),
                                            (3, "bob", False)]
    finally:
        engine.dispose()
