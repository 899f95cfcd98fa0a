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
